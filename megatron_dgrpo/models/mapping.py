"""Declarative Megatron-core <-> Hugging Face parameter tables, one per architecture.

Pure torch (no Megatron import): conversion, the rollout refit bridge and weight
verification all read the same table.

Vocabulary of this module:

* a *global* Megatron name carries the model-wide layer index
  (``decoder.layers.17.mlp.linear_fc1.weight``); a *local* name is what the ``GPTModel``
  of one pipeline stage calls it (layer index minus the stage's first layer);
* a *full* tensor is the logical, unsharded Megatron tensor: TP shards concatenated and,
  for vocabulary-parallel tensors, the padding rows removed ([vocab_size, hidden]);
* a *shard* is what one TP rank holds.

Names are the local-spec ones; with the Transformer Engine spec, the two per-layer norms are
fused into the following linear layer and renamed (:func:`to_te_name`, :func:`from_te_name`).

Megatron layouts encoded here:

* ``linear_qkv.weight`` [(heads + 2 * groups) * head_dim, hidden] is ordered per query group:
  ``[q heads of group 0, k_0, v_0, q heads of group 1, k_1, v_1, ...]``; TP rank r holds
  groups ``r * groups / tp ...`` (a plain dim-0 split of that layout);
* ``linear_fc1.weight`` [2 * ffn, hidden] is ``[gate; up]`` *per TP rank*: rank r holds
  ``[gate_r; up_r]``, so the full tensor is not a plain dim-0 concatenation of shards;
* vocabulary-parallel tensors are padded with zero rows to ``padded_vocab_size(tp)`` and
  then split along dim 0.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from megatron_dgrpo.models.config import ModelConfig


class TPSplit(enum.Enum):
    """How a full tensor is divided among tensor-parallel ranks."""

    REPLICATED = "replicated"      # every rank holds the full tensor (norm weights)
    COLUMN = "column"              # dim 0 (output features): column-parallel linear
    ROW = "row"                    # dim 1 (input features): row-parallel linear
    VOCAB = "vocab"                # dim 0 after zero-padding rows to the padded vocabulary
    GATED_COLUMN = "gated_column"  # [gate; up] stacked on dim 0: rank r holds [gate_r; up_r]


class Fusion(enum.Enum):
    """How Hugging Face tensors combine into one Megatron tensor."""

    COPY = "copy"          # one HF tensor, same layout
    QKV = "qkv"            # q, k, v projections -> per-query-group interleaved linear_qkv
    GATE_UP = "gate_up"    # gate and up projections -> [gate; up]


class Stage(enum.Enum):
    """Which pipeline stage owns a parameter."""

    FIRST = "first"
    LAYER = "layer"        # the stage that owns the layer
    LAST = "last"


class Presence(enum.Enum):
    """When a rule applies, depending on embedding tying and pipeline depth."""

    ALWAYS = "always"
    UNTIED = "untied"                          # separate output layer (lm_head)
    TIED_ON_OTHER_STAGE = "tied_other_stage"   # tied, and last stage != first stage


@dataclass(frozen=True)
class ParamRule:
    """One Megatron parameter and the Hugging Face tensor(s) it is made of.

    ``megatron`` and ``hf`` patterns use ``{layer}`` for the global layer index.
    ``hf_shapes`` gives each HF tensor's shape in symbolic dims (see :func:`dims`).
    ``exported`` is False for a copy of weights another rule already exports (the tied
    output layer held by the last pipeline stage), so Megatron -> HF skips it.
    """

    megatron: str
    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[str, ...], ...]
    fusion: Fusion
    split: TPSplit
    stage: Stage
    presence: Presence = Presence.ALWAYS
    exported: bool = True

    def applies_to(self, config: ModelConfig, pipeline_parallel: int) -> bool:
        if self.presence is Presence.UNTIED:
            return not config.tie_word_embeddings
        if self.presence is Presence.TIED_ON_OTHER_STAGE:
            return config.tie_word_embeddings and pipeline_parallel > 1
        return True


@dataclass(frozen=True)
class ArchitectureMapping:
    """The parameter table of one architecture plus its TE renames (local -> TE suffixes)."""

    architecture: str
    rules: tuple[ParamRule, ...]
    te_renames: tuple[tuple[str, str], ...]


_LAYER = "decoder.layers.{layer}."
_HF_LAYER = "model.layers.{layer}."

QWEN3 = ArchitectureMapping(
    architecture="qwen3",
    rules=(
        ParamRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                  (("vocab", "hidden"),), Fusion.COPY, TPSplit.VOCAB, Stage.FIRST),
        ParamRule(_LAYER + "input_layernorm.weight", (_HF_LAYER + "input_layernorm.weight",),
                  (("hidden",),), Fusion.COPY, TPSplit.REPLICATED, Stage.LAYER),
        ParamRule(_LAYER + "self_attention.linear_qkv.weight",
                  (_HF_LAYER + "self_attn.q_proj.weight", _HF_LAYER + "self_attn.k_proj.weight",
                   _HF_LAYER + "self_attn.v_proj.weight"),
                  (("q", "hidden"), ("kv", "hidden"), ("kv", "hidden")),
                  Fusion.QKV, TPSplit.COLUMN, Stage.LAYER),
        ParamRule(_LAYER + "self_attention.q_layernorm.weight",
                  (_HF_LAYER + "self_attn.q_norm.weight",), (("head_dim",),),
                  Fusion.COPY, TPSplit.REPLICATED, Stage.LAYER),
        ParamRule(_LAYER + "self_attention.k_layernorm.weight",
                  (_HF_LAYER + "self_attn.k_norm.weight",), (("head_dim",),),
                  Fusion.COPY, TPSplit.REPLICATED, Stage.LAYER),
        ParamRule(_LAYER + "self_attention.linear_proj.weight",
                  (_HF_LAYER + "self_attn.o_proj.weight",), (("hidden", "q"),),
                  Fusion.COPY, TPSplit.ROW, Stage.LAYER),
        ParamRule(_LAYER + "pre_mlp_layernorm.weight",
                  (_HF_LAYER + "post_attention_layernorm.weight",), (("hidden",),),
                  Fusion.COPY, TPSplit.REPLICATED, Stage.LAYER),
        ParamRule(_LAYER + "mlp.linear_fc1.weight",
                  (_HF_LAYER + "mlp.gate_proj.weight", _HF_LAYER + "mlp.up_proj.weight"),
                  (("ffn", "hidden"), ("ffn", "hidden")),
                  Fusion.GATE_UP, TPSplit.GATED_COLUMN, Stage.LAYER),
        ParamRule(_LAYER + "mlp.linear_fc2.weight", (_HF_LAYER + "mlp.down_proj.weight",),
                  (("hidden", "ffn"),), Fusion.COPY, TPSplit.ROW, Stage.LAYER),
        ParamRule("decoder.final_layernorm.weight", ("model.norm.weight",), (("hidden",),),
                  Fusion.COPY, TPSplit.REPLICATED, Stage.LAST),
        ParamRule("output_layer.weight", ("lm_head.weight",), (("vocab", "hidden"),),
                  Fusion.COPY, TPSplit.VOCAB, Stage.LAST, Presence.UNTIED),
        ParamRule("output_layer.weight", ("model.embed_tokens.weight",), (("vocab", "hidden"),),
                  Fusion.COPY, TPSplit.VOCAB, Stage.LAST, Presence.TIED_ON_OTHER_STAGE,
                  exported=False),
    ),
    te_renames=(
        ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
        ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
    ),
)

_MAPPINGS = {QWEN3.architecture: QWEN3}


def get_mapping(architecture: str) -> ArchitectureMapping:
    """The parameter table for ``architecture``; ValueError naming the known ones."""
    if architecture not in _MAPPINGS:
        raise ValueError(f"no parameter mapping for architecture {architecture!r}; "
                         f"known: {', '.join(sorted(_MAPPINGS))}")
    return _MAPPINGS[architecture]


def dims(config: ModelConfig) -> dict[str, int]:
    """Values of the symbolic dims used in ``ParamRule.hf_shapes``."""
    return {
        "vocab": config.vocab_size,
        "hidden": config.hidden_size,
        "ffn": config.ffn_hidden_size,
        "head_dim": config.head_dim,
        "q": config.num_attention_heads * config.head_dim,
        "kv": config.num_query_groups * config.head_dim,
    }


# ---------------------------------------------------------------------------------------
# Names: rules, layers and pipeline stages


@dataclass(frozen=True)
class StageParam:
    """A parameter held by one pipeline stage."""

    local_name: str
    global_name: str
    rule: ParamRule
    layer: int | None  # global layer index, None for non-layer parameters


def layers_per_stage(config: ModelConfig, pipeline_parallel: int) -> int:
    if config.num_layers % pipeline_parallel:
        raise ValueError(f"{config.num_layers} layers cannot be split evenly over "
                         f"{pipeline_parallel} pipeline stages")
    return config.num_layers // pipeline_parallel


def stage_params(config: ModelConfig, pp_rank: int, pipeline_parallel: int) -> list[StageParam]:
    """Every parameter of pipeline stage ``pp_rank``, in table order (layers ascending)."""
    per_stage = layers_per_stage(config, pipeline_parallel)
    first, last = pp_rank == 0, pp_rank == pipeline_parallel - 1
    rules = [r for r in get_mapping(config.architecture).rules
             if r.applies_to(config, pipeline_parallel)]
    params = [StageParam(r.megatron, r.megatron, r, None)
              for r in rules if r.stage is Stage.FIRST and first]
    for local in range(per_stage):
        layer = pp_rank * per_stage + local
        params += [StageParam(r.megatron.format(layer=local), r.megatron.format(layer=layer),
                              r, layer) for r in rules if r.stage is Stage.LAYER]
    params += [StageParam(r.megatron, r.megatron, r, None)
                for r in rules if r.stage is Stage.LAST and last]
    return params


def params_by_local_name(config: ModelConfig, pp_rank: int,
                         pipeline_parallel: int) -> dict[str, StageParam]:
    """Lookup for a live stage: local-spec ``state_dict`` name -> its parameter.

    With the TE spec, translate names with :func:`from_te_name` first.
    """
    return {p.local_name: p for p in stage_params(config, pp_rank, pipeline_parallel)}


def live_parameters(model: torch.nn.Module, config: ModelConfig, pp_rank: int,
                    pipeline_parallel: int) -> dict[str, tuple[StageParam, torch.Tensor]]:
    """Local-spec name -> (its table entry, the live tensor) for one rank's ``GPTModel``.

    ``model`` is the unwrapped model of pipeline stage ``pp_rank`` (local or TE spec).
    Raises ValueError naming parameters the table does not know, or expects and are absent.
    """
    arch = get_mapping(config.architecture)
    live = {from_te_name(name, arch): tensor
            for name, tensor in model.state_dict(keep_vars=True).items()
            if not name.endswith("_extra_state")}
    expected = params_by_local_name(config, pp_rank, pipeline_parallel)
    unknown, absent = sorted(set(live) - set(expected)), sorted(set(expected) - set(live))
    if unknown:
        raise ValueError(f"the {config.architecture} mapping does not know parameter(s) "
                         f"{unknown} of pipeline stage {pp_rank}")
    if absent:
        raise ValueError(f"the model lacks parameter(s) {absent} that the {config.architecture} "
                         f"mapping expects at pipeline stage {pp_rank}")
    return {name: (expected[name], tensor) for name, tensor in live.items()}


def all_params(config: ModelConfig, pipeline_parallel: int) -> list[StageParam]:
    """Parameters of all stages; a name may appear twice (tied embeddings over stages)."""
    return [p for pp_rank in range(pipeline_parallel)
            for p in stage_params(config, pp_rank, pipeline_parallel)]


_LAYER_INDEX = re.compile(r"^decoder\.layers\.(\d+)\.")


def local_to_global_name(local_name: str, pp_rank: int, config: ModelConfig,
                         pipeline_parallel: int) -> str:
    """Add the stage's layer offset to the layer index of a local name."""
    offset = pp_rank * layers_per_stage(config, pipeline_parallel)
    return _LAYER_INDEX.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", local_name)


def to_te_name(name: str, mapping: ArchitectureMapping) -> str:
    """Local-spec name -> Transformer Engine spec name (fused layer norms)."""
    for local_suffix, te_suffix in mapping.te_renames:
        if name.endswith("." + local_suffix) and _LAYER_INDEX.match(name):
            return name[: -len(local_suffix)] + te_suffix
    return name


def from_te_name(name: str, mapping: ArchitectureMapping) -> str:
    """Transformer Engine spec name -> local-spec name (inverse of :func:`to_te_name`)."""
    for local_suffix, te_suffix in mapping.te_renames:
        if name.endswith("." + te_suffix) and _LAYER_INDEX.match(name):
            return name[: -len(te_suffix)] + local_suffix
    return name


def hf_names(param: StageParam) -> tuple[str, ...]:
    return tuple(name.format(layer=param.layer) for name in param.rule.hf)


def hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the Hugging Face checkpoint, name -> shape."""
    values = dims(config)
    shapes: dict[str, tuple[int, ...]] = {}
    for param in all_params(config, 1):
        for name, symbolic in zip(hf_names(param), param.rule.hf_shapes):
            shapes[name] = tuple(values[d] for d in symbolic)
    return shapes


# ---------------------------------------------------------------------------------------
# Tensors: fusion (HF <-> full Megatron) and TP sharding (full <-> shards)


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              config: ModelConfig) -> torch.Tensor:
    """q [heads*hd, h], k/v [groups*hd, h] -> [(heads + 2*groups)*hd, h], grouped layout."""
    groups, hd = config.num_query_groups, config.head_dim
    hidden = q.shape[1]
    per_group_q = config.num_attention_heads // groups * hd
    return torch.cat([q.reshape(groups, per_group_q, hidden),
                      k.reshape(groups, hd, hidden),
                      v.reshape(groups, hd, hidden)], dim=1).reshape(-1, hidden)


def _unfuse_qkv(qkv: torch.Tensor, config: ModelConfig) -> list[torch.Tensor]:
    """Inverse of :func:`_fuse_qkv`: [(heads + 2*groups)*hd, h] -> [q, k, v]."""
    groups, hd = config.num_query_groups, config.head_dim
    hidden = qkv.shape[1]
    per_group_q = config.num_attention_heads // groups * hd
    q, k, v = qkv.reshape(groups, per_group_q + 2 * hd, hidden).split(
        [per_group_q, hd, hd], dim=1)
    return [t.reshape(-1, hidden).contiguous() for t in (q, k, v)]


def hf_to_megatron(param: StageParam, hf_tensors: Sequence[torch.Tensor],
                   config: ModelConfig) -> torch.Tensor:
    """The full Megatron tensor from its HF tensors (in ``hf_names(param)`` order)."""
    fusion = param.rule.fusion
    if fusion is Fusion.QKV:
        return _fuse_qkv(*hf_tensors, config)
    if fusion is Fusion.GATE_UP:
        return torch.cat(list(hf_tensors), dim=0)
    (tensor,) = hf_tensors
    return tensor


def megatron_to_hf(param: StageParam, full: torch.Tensor,
                   config: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` pairs for one full Megatron tensor; empty if not exported."""
    if not param.rule.exported:
        return []
    fusion = param.rule.fusion
    if fusion is Fusion.QKV:
        tensors = _unfuse_qkv(full, config)
    elif fusion is Fusion.GATE_UP:
        tensors = [t.contiguous() for t in full.chunk(2, dim=0)]
    else:
        tensors = [full]
    return list(zip(hf_names(param), tensors))


def megatron_full_shape(param: StageParam, config: ModelConfig) -> tuple[int, ...]:
    """Shape of the full (unsharded, unpadded) Megatron tensor."""
    values = dims(config)
    shapes = [tuple(values[d] for d in s) for s in param.rule.hf_shapes]
    if param.rule.fusion is Fusion.COPY:
        return shapes[0]
    return (sum(s[0] for s in shapes), shapes[0][1])


def _owned(chunks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous copies, so shards do not share storage (safetensors refuses that)."""
    return [c.clone(memory_format=torch.contiguous_format) for c in chunks]


def split_for_tp(split: TPSplit, full: torch.Tensor, tensor_parallel: int,
                 padded_vocab_size: int | None = None) -> list[torch.Tensor]:
    """Shards of a full tensor, one per TP rank (``padded_vocab_size`` for VOCAB only)."""
    if split is TPSplit.REPLICATED:
        return _owned([full] * tensor_parallel)
    if split is TPSplit.ROW:
        return _owned(full.chunk(tensor_parallel, dim=1))
    if split is TPSplit.COLUMN:
        return _owned(full.chunk(tensor_parallel, dim=0))
    if split is TPSplit.GATED_COLUMN:
        gate, up = full.chunk(2, dim=0)
        return [torch.cat([g, u], dim=0) for g, u in
                zip(gate.chunk(tensor_parallel, dim=0), up.chunk(tensor_parallel, dim=0))]
    if padded_vocab_size is None or padded_vocab_size < full.shape[0]:
        raise ValueError(f"vocabulary-parallel split needs padded_vocab_size >= "
                         f"{full.shape[0]}, got {padded_vocab_size}")
    padding = full.new_zeros((padded_vocab_size - full.shape[0],) + tuple(full.shape[1:]))
    return _owned(torch.cat([full, padding], dim=0).chunk(tensor_parallel, dim=0))


def merge_tp_shards(split: TPSplit, shards: Sequence[torch.Tensor],
                    vocab_size: int | None = None) -> torch.Tensor:
    """The full tensor from its TP shards (rank order); inverse of :func:`split_for_tp`.

    Replicated shards must be identical; vocabulary padding rows are dropped.
    """
    if split is TPSplit.REPLICATED:
        if any(not torch.equal(shards[0], s) for s in shards[1:]):
            raise ValueError("replicated tensor differs between tensor-parallel ranks")
        return shards[0]
    if split is TPSplit.ROW:
        return torch.cat(list(shards), dim=1)
    if split is TPSplit.COLUMN:
        return torch.cat(list(shards), dim=0)
    if split is TPSplit.GATED_COLUMN:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([g for g, _ in halves] + [u for _, u in halves], dim=0)
    if vocab_size is None:
        raise ValueError("merging a vocabulary-parallel tensor needs vocab_size")
    return torch.cat(list(shards), dim=0)[:vocab_size].contiguous()


def shard_shape(param: StageParam, config: ModelConfig,
                tensor_parallel: int) -> tuple[int, ...]:
    """Shape of one TP rank's shard."""
    full = list(megatron_full_shape(param, config))
    split = param.rule.split
    if split is TPSplit.VOCAB:
        full[0] = config.padded_vocab_size(tensor_parallel) // tensor_parallel
    elif split in (TPSplit.COLUMN, TPSplit.GATED_COLUMN):
        full[0] //= tensor_parallel
    elif split is TPSplit.ROW:
        full[1] //= tensor_parallel
    return tuple(full)


def check_hf_tensors(config: ModelConfig,
                     available: Mapping[str, tuple[int, ...]]) -> None:
    """Raise ValueError if HF tensors are missing, unexpected or of the wrong shape."""
    expected = hf_shapes(config)
    missing = sorted(set(expected) - set(available))
    if missing:
        raise ValueError(f"Hugging Face checkpoint is missing {len(missing)} tensor(s): "
                         f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    unexpected = sorted(set(available) - set(expected))
    if unexpected:
        raise ValueError(f"Hugging Face checkpoint has {len(unexpected)} tensor(s) the "
                         f"{config.architecture} mapping does not know: "
                         f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    wrong = [f"{name} {tuple(available[name])} (expected {shape})"
             for name, shape in expected.items() if tuple(available[name]) != shape]
    if wrong:
        raise ValueError(f"shape mismatch against config.json: {'; '.join(wrong[:4])}")
