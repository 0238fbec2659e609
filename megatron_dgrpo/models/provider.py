"""Megatron-core ``GPTModel``: built from typed configs, and Megatron's parallel state.

Typical use on every rank (``torchrun`` or :func:`megatron_dgrpo.parallel.launch.run_distributed`)::

    initialize_parallel(parallel, seed=1234)
    model = build_stage_model(model_config, parallel)   # this rank's stage and TP shard
    load_megatron_checkpoint_into(model, ckpt_dir)       # from megatron_dgrpo.models.convert

(``build_stage_model`` is :func:`build_gpt_model` at ``virtual_pipeline_stages = 1``, the
rank's :class:`~megatron_dgrpo.models.chunks.VirtualStages` with more.)

The Transformer Engine layer spec is used when TE and CUDA are present (and
``parallel.use_te`` allows it), Megatron's local (plain torch) spec otherwise. On machines
without CUDA the CPU adaptations of :mod:`megatron_dgrpo.parallel.cpu` are applied and the
fusion flags that need CUDA are switched off. The model's forward with
``labels=None`` returns logits [batch, seq, padded_vocab / tp] on the last pipeline stage
(columns at and past ``model.vocab_size`` are padding).

Running a built model (one pipeline stage's output, final hidden states, logits, the
output weight, packed sequences, Megatron's schedules over micro-batches):
:mod:`megatron_dgrpo.models.forward`.
"""

from __future__ import annotations

import dataclasses
import os
import random

import numpy as np
import torch

from megatron_dgrpo.models.config import (
    ModelConfig,
    ParallelConfig,
    Runtime,
    validate_layout,
)
from megatron_dgrpo.parallel.collectives import init_default_group, world_size
from megatron_dgrpo.parallel.cpu import adapt_megatron_for_cpu, default_backend

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def validate_for_runtime(model: ModelConfig, parallel: ParallelConfig,
                         runtime: Runtime | None = None) -> None:
    """All start-up checks: each config alone, then the model against the layout."""
    model.validate()
    parallel.validate(runtime)
    validate_layout(model, parallel)


def _megatron_virtual_size(parallel: ParallelConfig) -> int | None:
    """Megatron's ``virtual_pipeline_model_parallel_size``: None without virtual stages."""
    return parallel.virtual_pipeline_stages if parallel.virtual_pipeline_stages > 1 else None


def transformer_config(model: ModelConfig, parallel: ParallelConfig,
                       runtime: Runtime | None = None):
    """The Megatron ``TransformerConfig`` for ``model`` laid out as ``parallel``."""
    from megatron.core.transformer import TransformerConfig

    runtime = runtime or Runtime.detect()
    validate_for_runtime(model, parallel, runtime)
    dtype = _TORCH_DTYPES[model.params_dtype]
    on_cpu = not runtime.cuda
    # calculate_per_token_loss: the trainer's loss pieces are normalised by global token
    # counts already (train/loop.py), so Megatron's schedules must not divide them by the
    # number of micro-batches, nor DDP average gradients over the data-parallel ranks.
    # variable_seq_lengths: micro-batches are trimmed to their own width (and rows), so
    # pipeline stages exchange each activation's shape before it.
    # overlap_p2p_comm with virtual stages: at PP=2 a rank's previous and next stage are the
    # same peer, and a combined forward + backward exchange (the non-overlapped schedule's
    # steady state) pairs activations with gradients; the overlapped schedule exchanges
    # each direction on its own (Megatron-LM issue #750).
    # Fused kernels and CUDA-only synchronisation must stay off on CPU (see parallel/cpu.py).
    cpu_flags = {"gradient_accumulation_fusion": False, "persist_layer_norm": False,
                 "apply_rope_fusion": False, "batch_p2p_sync": False} if on_cpu else {}
    config = TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        qk_layernorm=model.qk_layernorm,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=_megatron_virtual_size(parallel),
        context_parallel_size=parallel.context_parallel,
        cp_comm_type=parallel.cp_comm_type,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        **(parallel.fp8.megatron_fields() if parallel.fp8 else {}),
        use_cpu_initialization=on_cpu,
        calculate_per_token_loss=True,
        **({"overlap_p2p_comm": True, "batch_p2p_comm": False}
           if parallel.virtual_pipeline_stages > 1 else {}),
        **cpu_flags,
    )
    # Set after construction: TransformerConfig refuses variable_seq_lengths beside its
    # (here unused) default MoE token dispatcher.
    config.variable_seq_lengths = parallel.pipeline_parallel > 1
    # YaRN: GPTModel's YarnRotaryEmbedding reads these (fields of Megatron's MLA config), and
    # the attention scales q and k by YaRN's factor when the config has them.
    if model.yarn_factor:
        for name, value in (("rotary_scaling_factor", model.yarn_factor),
                            ("original_max_position_embeddings",
                             model.yarn_original_max_position_embeddings),
                            ("beta_fast", 32.0), ("beta_slow", 1.0), ("mscale", 1.0),
                            ("mscale_all_dim", 0.0), ("correction_range_round_to_int", True)):
            setattr(config, f"yarn_{name}", value)
    return config


def layer_spec(model: ModelConfig, parallel: ParallelConfig, runtime: Runtime | None = None):
    """TE layer spec when TE and CUDA are usable, the local (torch) spec otherwise: its core
    attention on PyTorch SDPA (:class:`~megatron_dgrpo.models.sdpa_attention.SDPACoreAttention`),
    its self-attention caching rotated keys
    (:class:`~megatron_dgrpo.models.sdpa_attention.RotatedCacheSelfAttention`)."""
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_dgrpo.models.sdpa_attention import RotatedCacheSelfAttention, SDPACoreAttention

    if parallel.uses_te(runtime):
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=model.qk_layernorm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=model.qk_layernorm,
                                                    normalization="RMSNorm")
    attention = spec.submodules.self_attention
    attention.module = RotatedCacheSelfAttention  # keys rotated once, when cached
    attention.submodules = dataclasses.replace(attention.submodules,
                                               core_attention=SDPACoreAttention)
    return spec


def build_gpt_model(model: ModelConfig, parallel: ParallelConfig, vp_stage: int | None = None):
    """This rank's ``GPTModel`` (after initialize_parallel): its TP shard of its pipeline
    stage, or with virtual stages (``parallel.virtual_pipeline_stages > 1``) of its chunk
    ``vp_stage`` (pipeline stage ``vp_stage x PP + pp_rank``: embeddings only in the very
    first, the final norm and output layer only in the very last). Use
    :func:`build_stage_model` for all of a rank's chunks."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("call initialize_parallel(parallel_config) before build_gpt_model")
    if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_virtual_pipeline_model_parallel_world_size() or 1,
            ps.get_context_parallel_world_size()) != (
            parallel.tensor_parallel, parallel.pipeline_parallel,
            parallel.virtual_pipeline_stages, parallel.context_parallel):
        raise ValueError("the initialised model-parallel groups do not match parallel config "
                         f"(TP={parallel.tensor_parallel}, PP={parallel.pipeline_parallel}, "
                         f"virtual stages={parallel.virtual_pipeline_stages}, "
                         f"CP={parallel.context_parallel})")
    if (vp_stage is None) != (parallel.virtual_pipeline_stages == 1):
        raise ValueError("vp_stage is needed exactly when parallel.virtual_pipeline_stages > 1")
    gpt = GPTModel(
        config=transformer_config(model, parallel),
        transformer_layer_spec=layer_spec(model, parallel),
        vocab_size=model.padded_vocab_size(parallel.tensor_parallel),
        max_sequence_length=model.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="yarn" if model.yarn_factor else "rope",
        rotary_base=model.rope_base,
        parallel_output=True,
        vp_stage=vp_stage,
    )
    if Runtime.detect().cuda:
        # Megatron creates some modules of the local spec (its torch norms) on the CPU even
        # without use_cpu_initialization; its own trainer moves the model afterwards too.
        gpt.cuda(torch.cuda.current_device())
    return gpt


def build_stage_model(model: ModelConfig, parallel: ParallelConfig) -> torch.nn.Module:
    """Everything this rank holds of the model: its ``GPTModel``, or with virtual stages a
    :class:`~megatron_dgrpo.models.chunks.VirtualStages` of its chunks in stage order."""
    from megatron_dgrpo.models.chunks import VirtualStages

    if parallel.virtual_pipeline_stages == 1:
        return build_gpt_model(model, parallel)
    return VirtualStages([build_gpt_model(model, parallel, vp_stage)
                          for vp_stage in range(parallel.virtual_pipeline_stages)])


def initialize_parallel(parallel: ParallelConfig, seed: int = 1234) -> None:
    """Set up torch.distributed (if needed), Megatron's model-parallel groups and RNG seeds.

    Uses the ``torchrun`` environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) when it has to
    create the default process group; NCCL with CUDA, gloo without. On CPU, applies
    :func:`~megatron_dgrpo.parallel.cpu.adapt_megatron_for_cpu` first.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel.validate()
    init_default_group(default_backend(), parallel.timeout_s)
    if world_size() % parallel.model_parallel_size:
        raise ValueError(f"world size {world_size()} is not a multiple of "
                         f"TP x PP x CP = {parallel.model_parallel_size}")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    adapt_megatron_for_cpu()
    ps.initialize_model_parallel(tensor_model_parallel_size=parallel.tensor_parallel,
                                 pipeline_model_parallel_size=parallel.pipeline_parallel,
                                 virtual_pipeline_model_parallel_size=(
                                     _megatron_virtual_size(parallel)),
                                 context_parallel_size=parallel.context_parallel,
                                 # a float: Megatron's groups wait timeout_s, not a
                                 # rounded-up minute (timedelta(minutes=...) takes one)
                                 distributed_timeout_minutes=parallel.timeout_s / 60)
    random.seed(seed)  # Python's and NumPy's generators too, so that every run of a config
    np.random.seed(seed % 2**32)  # starts (and checkpoints) the same RNG states
    torch.manual_seed(seed)  # same CPU-initialised master weights on every TP rank
    model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down Megatron's model-parallel groups (the default process group stays)."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
