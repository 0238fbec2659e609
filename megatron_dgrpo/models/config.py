"""Typed model and parallel-layout configuration, with start-up validation.

Two plain dataclasses (defaults and type hints only, so the YAML loader in
:mod:`megatron_dgrpo.config` can build them from dicts):

* :class:`ModelConfig`: the architecture's hyper-parameters (Qwen3 first). Defaults are the
  ``tiny-qwen3`` test model, so an empty ``model:`` section runs on a laptop CPU.
* :class:`ParallelConfig`: how the model is laid out (TP, PP, CP, sequence parallel) and
  which kernels it may use (Transformer Engine, its FP8 recipe: :class:`TransformerFp8Config`).

Each has ``validate()`` raising ``ValueError``. Checks that need both (heads divisible by TP,
layers by PP) live in :func:`validate_layout`, which the model provider calls at start-up.

Vocabulary padding follows Megatron's convention: the embedding and output layer hold
``padded_vocab_size(tp)`` rows, the vocabulary size rounded up to a multiple of
``make_vocab_size_divisible_by * tp``, so every TP rank owns an equal slice. Rows at and past
``vocab_size`` are padding: zero in converted checkpoints, and their logits must be masked
by anything that normalises over the vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from megatron_dgrpo.config import require_choice

SUPPORTED_ARCHITECTURES = ("qwen3",)

_HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16"}


@dataclass
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer (Qwen3 family).

    Attention: ``num_attention_heads`` query heads of size ``head_dim`` share
    ``num_query_groups`` key/value heads (GQA); q and k are RMS-normalised per head
    (``qk_layernorm``) before rotary embeddings with base ``rope_base``. MLP: SwiGLU with
    ``ffn_hidden_size``. Norms: RMSNorm with ``norm_eps``. No biases.

    Long context: ``yarn_factor`` (> 1) turns on YaRN rotary scaling (Qwen3's way past its
    pre-training length): frequencies of the dimensions that rotate fewer than
    ``beta_slow = 1`` times within ``yarn_original_max_position_embeddings`` positions are
    divided by the factor, those rotating more than ``beta_fast = 32`` times are kept, a
    linear ramp blends between; attention logits are scaled by ``(0.1 ln(factor) + 1)^2``.
    ``None`` = plain RoPE.
    """

    architecture: str = "qwen3"
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 192
    num_attention_heads: int = 4
    num_query_groups: int = 2
    head_dim: int = 32
    vocab_size: int = 1024
    max_position_embeddings: int = 4096
    rope_base: float = 1_000_000.0
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    qk_layernorm: bool = True
    params_dtype: Literal["fp32", "bf16"] = "fp32"
    make_vocab_size_divisible_by: int = 128
    yarn_factor: float | None = None
    yarn_original_max_position_embeddings: int | None = None

    def validate(self) -> None:
        """Raise ValueError if the hyper-parameters cannot describe a supported model."""
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "head_dim", "vocab_size", "max_position_embeddings",
                     "make_vocab_size_divisible_by"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"model.num_query_groups ({self.num_query_groups}) for grouped-query attention")
        if self.architecture == "qwen3" and not self.qk_layernorm:
            raise ValueError("model.qk_layernorm must be true for qwen3 (its q/k norms are "
                             "part of the architecture and of the checkpoint)")
        if self.rope_base <= 0 or self.norm_eps <= 0:
            raise ValueError("model.rope_base and model.norm_eps must be > 0")
        if self.params_dtype not in ("fp32", "bf16"):
            raise ValueError(f"model.params_dtype must be 'fp32' or 'bf16', "
                             f"got {self.params_dtype!r}")
        yarn = (self.yarn_factor, self.yarn_original_max_position_embeddings)
        if (yarn[0] is None) != (yarn[1] is None):
            raise ValueError("model.yarn_factor and model.yarn_original_max_position_embeddings "
                             "go together (both set for YaRN, both null for plain RoPE)")
        if yarn[0] is not None:
            if yarn[0] <= 1:
                raise ValueError(f"model.yarn_factor must be > 1, got {yarn[0]}")
            if not 1 <= yarn[1] <= self.max_position_embeddings:
                raise ValueError(
                    f"model.yarn_original_max_position_embeddings ({yarn[1]}) must be in "
                    f"[1, max_position_embeddings = {self.max_position_embeddings}]")

    def padded_vocab_size(self, tensor_parallel: int) -> int:
        """Rows of the embedding/output layer at this TP size (Megatron's padding rule)."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return -(-self.vocab_size // multiple) * multiple

    @classmethod
    def from_hf_config(cls, hf_config: Mapping[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict; ValueError if it is not Qwen3-shaped."""
        return _model_config_from_hf(cls, hf_config)

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` dict (transformers ``Qwen3ForCausalLM``)."""
        return _model_config_to_hf(self)


CP_COMM_TYPES = ("p2p", "a2a", "a2a+p2p", "allgather")

# Transformer Engine FP8 recipes (Megatron's ``fp8_recipe``) and the oldest TE that has each
# (megatron/core/fp8_utils.py get_fp8_recipe); mxfp8 runs on Blackwell (sm100+) only.
TE_FP8_RECIPES = {"delayed": "1.0", "tensorwise": "2.2.0.dev0", "blockwise": "2.3.0.dev0",
                  "mxfp8": "2.1.0"}
FP8_FORMATS = ("hybrid", "e4m3")


@dataclass
class TransformerFp8Config:
    """Transformer Engine FP8 for the transformer layers' GEMMs (``parallel.fp8``; GPU with
    TE only). The output layer's GEMMs inside the fused loss have their own option,
    ``loss_fp8`` (:mod:`megatron_dgrpo.parallel.fp8`, runs without TE).

    ``recipe`` (Megatron's ``fp8_recipe``): ``delayed`` (scales from an amax history),
    ``tensorwise`` (per-tensor current scaling, TE >= 2.2), ``blockwise`` (1x128 and
    128x128 block scales, TE >= 2.3), ``mxfp8`` (32-element blocks with E8M0 scales,
    TE >= 2.1, Blackwell GPUs). ``format`` (Megatron's ``fp8``): ``hybrid`` (E4M3 forward,
    E5M2 gradients) or ``e4m3``.
    """

    recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    format: Literal["hybrid", "e4m3"] = "hybrid"

    def validate(self) -> None:
        require_choice("parallel.fp8.recipe", self.recipe, TE_FP8_RECIPES)
        require_choice("parallel.fp8.format", self.format, FP8_FORMATS)

    def check_runtime(self, runtime: Runtime) -> None:
        """ValueError if the installed TE or the GPU lacks this recipe (when known)."""
        from packaging.version import Version

        oldest = TE_FP8_RECIPES[self.recipe]
        installed = runtime.transformer_engine_version
        if installed is not None and Version(installed) < Version(oldest):
            raise ValueError(f"parallel.fp8.recipe={self.recipe} needs Transformer Engine >= "
                             f"{oldest}; this machine has {installed}")
        capability = runtime.cuda_capability
        if self.recipe == "mxfp8" and capability is not None and capability < (10, 0):
            raise ValueError(f"parallel.fp8.recipe=mxfp8 needs a Blackwell GPU (compute "
                             f"capability >= 10.0); this one has {capability[0]}.{capability[1]}")

    def megatron_fields(self) -> dict[str, str]:
        """The ``TransformerConfig`` fields this maps to."""
        return {"fp8": self.format, "fp8_recipe": self.recipe}


@dataclass
class ParallelConfig:
    """Model-parallel layout and kernel choice.

    ``use_te``: ``"auto"`` uses Transformer Engine layers when TE and CUDA are present and
    Megatron's local (plain torch) layers otherwise; ``True`` requires TE; ``False`` never
    uses it. Sequence parallelism and FP8 (``fp8``: a :class:`TransformerFp8Config`, None =
    off) need TE on CUDA.

    ``virtual_pipeline_stages``: model chunks per pipeline rank (Megatron's virtual
    pipeline size). The layers are cut into ``pipeline_parallel x virtual_pipeline_stages``
    contiguous stages; rank ``p`` holds stages ``p, p + PP, p + 2 PP, ...`` and Megatron's
    interleaved schedule runs them, which shrinks the pipeline bubble by that factor at the
    price of more point-to-point traffic and more activations in flight on the first ranks.
    1 (default): one contiguous stage per rank (1F1B).

    ``cp_comm_type`` (Megatron's names) picks how context-parallel attention exchanges keys
    and values: ``p2p`` (ring), ``a2a``, ``a2a+p2p`` are Transformer Engine's kernels (CUDA);
    ``allgather`` gathers the whole sequence's keys and values on every CP rank and attends
    locally, which the local layer spec also serves (PyTorch SDPA), so CP runs without TE
    (on CPU too). Exact either way; allgather holds ``T`` keys/values per rank.

    ``gpu_memory_gib``: memory of each GPU, for the start-up memory check of CUDA runs
    (:mod:`megatron_dgrpo.train.memory`); None: what the device reports.
    """

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_stages: int = 1
    context_parallel: int = 1
    cp_comm_type: Literal["p2p", "a2a", "a2a+p2p", "allgather"] = "p2p"
    sequence_parallel: bool = False
    use_te: bool | Literal["auto"] = "auto"
    fp8: TransformerFp8Config | None = None
    gpu_memory_gib: float | None = None
    # Seconds the start-up rendezvous and each collective wait for the other ranks before
    # this rank stops with an error naming the lost peer (a dead rank's closed connection
    # is noticed at once; this bounds a hung or unreachable one). Megatron's groups round
    # it up to whole minutes.
    timeout_s: float = 600.0

    def validate(self, runtime: Runtime | None = None) -> None:
        """Raise ValueError if this layout cannot run on ``runtime`` (default: this machine)."""
        for name in ("tensor_parallel", "pipeline_parallel", "virtual_pipeline_stages",
                     "context_parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.virtual_pipeline_stages > 1 and self.pipeline_parallel == 1:
            raise ValueError(f"parallel.virtual_pipeline_stages={self.virtual_pipeline_stages} "
                             "needs pipeline_parallel > 1: virtual stages interleave the "
                             "stages of several pipeline ranks")
        if self.timeout_s <= 0:
            raise ValueError(f"parallel.timeout_s must be > 0, got {self.timeout_s}")
        if self.use_te not in (True, False, "auto"):
            raise ValueError(f"parallel.use_te must be true, false or 'auto', got {self.use_te!r}")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ValueError("parallel.sequence_parallel needs tensor_parallel > 1")
        if self.gpu_memory_gib is not None and self.gpu_memory_gib <= 0:
            raise ValueError(f"parallel.gpu_memory_gib must be > 0, got {self.gpu_memory_gib}")
        runtime = runtime or Runtime.detect()
        if self.use_te is True and not runtime.has_te_on_cuda:
            raise ValueError(f"parallel.use_te=true needs Transformer Engine on CUDA; "
                             f"this machine has {runtime.describe()}")
        if self.cp_comm_type not in CP_COMM_TYPES:
            raise ValueError(f"parallel.cp_comm_type must be one of {', '.join(CP_COMM_TYPES)}, "
                             f"got {self.cp_comm_type!r}")
        uses_te = self.uses_te(runtime)
        needs_te = [what for what, wanted in (
            (f"context parallelism with cp_comm_type={self.cp_comm_type}",
             self.context_parallel > 1 and self.cp_comm_type != "allgather"),
            ("sequence parallelism", self.sequence_parallel),
            (f"FP8 for the transformer layers (parallel.fp8.recipe="
             f"{self.fp8.recipe if self.fp8 else ''})", self.fp8 is not None)) if wanted]
        if needs_te and not uses_te:
            reason = ("parallel.use_te is false" if self.use_te is False
                      else f"this machine has {runtime.describe()}")
            hint = ("; parallel.cp_comm_type=allgather runs context parallelism without it"
                    if self.context_parallel > 1 and self.cp_comm_type != "allgather" else "")
            if self.fp8 is not None:
                hint += ("; FP8 GEMMs of the loss's output layer (loss_fp8) run without "
                         "Transformer Engine")
            raise ValueError(f"{' and '.join(needs_te)} needs Transformer Engine on CUDA; "
                             f"{reason}{hint}")
        if self.fp8 is not None:
            self.fp8.check_runtime(runtime)

    def uses_te(self, runtime: Runtime | None = None) -> bool:
        """Whether models are built with the Transformer Engine layer spec."""
        runtime = runtime or Runtime.detect()
        return bool(self.use_te) and runtime.has_te_on_cuda

    @property
    def pipeline_stages(self) -> int:
        """Contiguous layer ranges the model is cut into: PP x virtual stages per rank
        (stage ``s`` lives on pipeline rank ``s % PP`` as its chunk ``s // PP``)."""
        return self.pipeline_parallel * self.virtual_pipeline_stages

    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one copy of the model: TP x PP x CP."""
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel


@dataclass(frozen=True)
class Runtime:
    """What this process can use: CUDA, and Transformer Engine importable (with the GPU's
    compute capability and TE's version where detected; None = unknown)."""

    cuda: bool
    transformer_engine: bool
    cuda_capability: tuple[int, int] | None = None
    transformer_engine_version: str | None = None

    @property
    def has_te_on_cuda(self) -> bool:
        return self.cuda and self.transformer_engine

    def describe(self) -> str:
        cuda = "CUDA" if self.cuda else "no CUDA"
        te = "Transformer Engine" if self.transformer_engine else "no Transformer Engine"
        return f"{cuda} and {te}"

    @staticmethod
    @functools.lru_cache(maxsize=1)
    def detect() -> Runtime:
        import torch

        if not torch.cuda.is_available():
            return Runtime(cuda=False, transformer_engine=False)
        capability = tuple(torch.cuda.get_device_capability())
        try:  # on machines without CUDA libraries TE raises other errors than ImportError
            import transformer_engine
            import transformer_engine.pytorch  # noqa: F401
        except Exception:  # noqa: BLE001
            return Runtime(cuda=True, transformer_engine=False, cuda_capability=capability)
        return Runtime(cuda=True, transformer_engine=True, cuda_capability=capability,
                       transformer_engine_version=getattr(transformer_engine, "__version__", None))


def validate_layout(model: ModelConfig, parallel: ParallelConfig) -> None:
    """Raise ValueError if ``model`` cannot be split as ``parallel`` asks."""
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    if model.num_attention_heads % tp:
        raise ValueError(f"model.num_attention_heads ({model.num_attention_heads}) is not "
                         f"divisible by parallel.tensor_parallel ({tp})")
    if model.num_query_groups % tp:
        raise ValueError(f"model.num_query_groups ({model.num_query_groups}) is not divisible "
                         f"by parallel.tensor_parallel ({tp})")
    if model.ffn_hidden_size % tp:
        raise ValueError(f"model.ffn_hidden_size ({model.ffn_hidden_size}) is not divisible "
                         f"by parallel.tensor_parallel ({tp})")
    if model.num_layers % pp:
        raise ValueError(f"model.num_layers ({model.num_layers}) is not divisible by "
                         f"parallel.pipeline_parallel ({pp})")
    if model.num_layers % parallel.pipeline_stages:
        raise ValueError(f"model.num_layers ({model.num_layers}) is not divisible by "
                         f"parallel.pipeline_parallel x virtual_pipeline_stages "
                         f"({pp} x {parallel.virtual_pipeline_stages})")


_HF_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                "rms_norm_eps")


# YaRN keys that may appear in a config.json with their only supported values (the defaults).
_HF_YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": True,
                     "attention_factor": None, "mscale": None, "mscale_all_dim": None}


def _hf_rope(hf: Mapping[str, Any]) -> dict[str, Any]:
    """``rope_base``, ``yarn_factor``, ``yarn_original_max_position_embeddings`` from
    ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (4.x)."""
    parameters = dict(hf.get("rope_parameters") or {})
    parameters.update(hf.get("rope_scaling") or {})
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    theta = parameters.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise ValueError("config.json is missing rope_theta (or rope_parameters.rope_theta)")
    if rope_type == "default":
        return {"rope_base": float(theta)}
    if rope_type != "yarn":
        raise ValueError(f"config.json asks for rope scaling {rope_type!r}; supported: plain "
                         f"RoPE and yarn")
    odd = [f"{key}={parameters[key]!r}" for key, value in _HF_YARN_DEFAULTS.items()
           if parameters.get(key, value) != value]
    if odd or parameters.get("factor") is None:
        raise ValueError(f"config.json's yarn rope scaling needs a factor and default "
                         f"beta_fast/beta_slow/attention scaling; got {parameters}")
    original = parameters.get("original_max_position_embeddings", hf["max_position_embeddings"])
    return {"rope_base": float(theta), "yarn_factor": float(parameters["factor"]),
            "yarn_original_max_position_embeddings": int(original)}


def _model_config_from_hf(cls, hf: Mapping[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture: config.json has model_type="
                         f"{model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    missing = [key for key in _HF_REQUIRED if hf.get(key) is None]
    if missing:
        raise ValueError(f"config.json is missing required field(s): {', '.join(missing)}")
    unsupported = [f"{key}={hf[key]!r}" for key, fine in (
        ("attention_bias", False), ("use_sliding_window", False), ("hidden_act", "silu"))
        if key in hf and hf[key] != fine]
    if unsupported:
        raise ValueError(f"config.json uses unsupported option(s): {', '.join(unsupported)}")
    hf_dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if hf_dtype not in _HF_DTYPES:
        raise ValueError(f"config.json dtype {hf_dtype!r} is not supported; "
                         f"use one of {sorted(_HF_DTYPES)}")
    config = cls(
        architecture=model_type,
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=int(hf["hidden_size"]),
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=int(hf["num_attention_heads"]),
        num_query_groups=int(hf["num_key_value_heads"]),
        head_dim=int(hf["head_dim"]),
        vocab_size=int(hf["vocab_size"]),
        max_position_embeddings=int(hf["max_position_embeddings"]),
        **_hf_rope(hf),
        norm_eps=float(hf["rms_norm_eps"]),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qk_layernorm=True,
        params_dtype=_HF_DTYPES[hf_dtype],
    )
    config.validate()
    return config


def _model_config_to_hf(config: ModelConfig) -> dict[str, Any]:
    config.validate()
    hf_dtype = {short: long for long, short in _HF_DTYPES.items()}[config.params_dtype]
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": config.architecture,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_query_groups,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.norm_eps,
        # transformers >= 5 reads rope_parameters; 4.x and vLLM's older paths read rope_theta.
        "rope_parameters": _rope_parameters_to_hf(config),
        "rope_theta": config.rope_base,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "dtype": hf_dtype,
    }


def _rope_parameters_to_hf(config: ModelConfig) -> dict[str, Any]:
    if config.yarn_factor is None:
        return {"rope_type": "default", "rope_theta": config.rope_base}
    return {"rope_type": "yarn", "rope_theta": config.rope_base, "factor": config.yarn_factor,
            "original_max_position_embeddings": config.yarn_original_max_position_embeddings}
