"""The run configuration of ``dgrpo train``: one YAML file, typed, validated before any work.

    run_dir: runs/dgrpo-tiny
    steps: 20
    student: {preset: tiny-qwen3, init_from: ckpts/student-tp2}
    teacher: {preset: small-qwen3, init_from: ckpts/teacher-tp2}
    loss: {objective: dgrpo, kl_coef: 0.05}
    sampling: {n: 4, temperature: 1.0, max_new_tokens: 64}
    data: {paths: [data/synth], max_prompt_tokens: 4096}
    tokenizer: tok/

Every section is a dataclass owned by the module that uses it (``LossConfig`` by the loss,
``SamplingParams`` by the engines, ``LongBlocksConfig`` by the loader, ...);
:meth:`RunConfig.validate` adds the checks that need two sections at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_dgrpo.algorithms.objectives import LossConfig
from megatron_dgrpo.data.longblocks import LongBlocksConfig
from megatron_dgrpo.data.rewards import RewardConfig
from megatron_dgrpo.models.config import ModelConfig, ParallelConfig, Runtime
from megatron_dgrpo.models.presets import get_preset
from megatron_dgrpo.parallel.fp8 import Fp8LossConfig, check_fp8_shapes, fp8_unsupported_reason
from megatron_dgrpo.rollout.engine import SamplingParams
from megatron_dgrpo.train.schedule import learning_rate

# Objectives that read the teacher, and those that sample rollouts.
TEACHER_OBJECTIVES = ("kd", "opd", "dgrpo")
ON_POLICY_OBJECTIVES = ("grpo", "opd", "dgrpo")


@dataclass
class ModelSource:
    """A model: its architecture (a preset, or explicit hyper-parameters) and its weights.

    ``init_from``: a Megatron checkpoint directory (``dgrpo convert hf-to-megatron`` output,
    or ``RUN_DIR/checkpoints/step_N/model`` of an earlier run); its stored config wins over
    ``preset``/``model``. Without it the weights are random (tests, smoke runs).

    ``engine`` (teacher only): ``megatron`` runs the teacher's forward in the trainer (full
    logits); ``vllm`` serves its log-prob and its top-``topk`` next tokens from a vLLM engine
    started from these weights (:mod:`megatron_dgrpo.train.vllm_teacher`; engine dtype, KV
    cache and GPU memory share from the ``rollout`` section), for ``loss.kl_estimator``
    topk, k1, k2 or k3.
    """

    preset: str | None = "tiny-qwen3"
    model: ModelConfig | None = None
    init_from: str | None = None
    offload: bool = False  # teacher only: parameters in host memory between uses (no-op on CPU)
    engine: Literal["megatron", "vllm"] = "megatron"  # teacher only, see above
    topk: int = 20  # engine=vllm: top-k tokens per position (vLLM prompt_logprobs)

    def model_config(self) -> ModelConfig:
        if self.init_from is not None:
            from megatron_dgrpo.models.convert import MegatronCheckpoint

            return MegatronCheckpoint(self.init_from).config
        if self.model is not None:
            return self.model
        if self.preset is None:
            raise ValueError("a model needs one of preset, model or init_from")
        return get_preset(self.preset)


@dataclass
class OptimConfig:
    """Adam(W) through Megatron's optimizer (plain, non-distributed on CPU), with the
    learning-rate schedule of :mod:`megatron_dgrpo.train.schedule` (``lr`` is the peak)."""

    lr: float = 1e-4
    warmup_steps: int = 0
    decay: Literal["constant", "cosine", "linear"] = "constant"
    decay_steps: int | None = None  # steps after warm-up to reach min_lr (None: to the end)
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = 0.0  # Megatron's clipping asserts CUDA tensors: keep 0 on CPU

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.clip_grad < 0:
            raise ValueError(f"optim.clip_grad must be >= 0, got {self.clip_grad}")
        if self.warmup_steps < 0 or (self.decay_steps is not None and self.decay_steps < 1):
            raise ValueError("optim.warmup_steps must be >= 0 and optim.decay_steps >= 1")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")

    def lr_at(self, step: int, total_steps: int) -> float:
        """The learning rate of 1-based ``step`` of a ``total_steps`` run."""
        decay_steps = self.decay_steps or max(1, total_steps - self.warmup_steps)
        return learning_rate(step, self.lr, self.warmup_steps, self.decay, decay_steps,
                             self.min_lr)


@dataclass
class RolloutConfig:
    """Which engine samples the on-policy rollouts, and how it follows the trainer.

    ``embedded``: the trainer's own Megatron model with a KV cache (always on the current
    weights). ``vllm``: a colocated vLLM engine per data-parallel replica, on its first
    rank (see :mod:`megatron_dgrpo.train.vllm_rollouts`), refitted after every optimizer step and
    verified every ``verify_every`` steps (0: never); verification failing stops training.
    """

    engine: Literal["embedded", "vllm"] = "embedded"
    verify_every: int = 1
    verify_sequences: int = 2  # probe sequences (this step's first rollouts) per verification
    verify_logprob_tol: float = 1e-3  # nats; fp32 engines agree to ~1e-5, bf16 needs ~0.1
    refit_bucket_mb: float = 256.0
    dtype: str = "auto"  # vLLM weights/activations: auto (= the student's), float32, bfloat16
    kv_cache_gib: float = 1.0  # CPU only; on GPU gpu_memory_utilization rules
    gpu_memory_utilization: float = 0.5  # GPU: fraction vLLM may take beside the trainer
    sleep_level: int = 2  # GPU: release weights + KV cache while training (0: never); CPU: no-op

    def validate(self) -> None:
        if self.verify_every < 0:
            raise ValueError(f"rollout.verify_every must be >= 0 (0 = never), got {self.verify_every}")
        if self.verify_sequences < 1:
            raise ValueError(f"rollout.verify_sequences must be >= 1, got {self.verify_sequences}")
        if self.verify_logprob_tol <= 0 or self.refit_bucket_mb <= 0 or self.kv_cache_gib <= 0:
            raise ValueError("rollout.verify_logprob_tol, refit_bucket_mb and kv_cache_gib "
                             "must be > 0")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"rollout.gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization}")
        if self.sleep_level not in (0, 1, 2):
            raise ValueError(f"rollout.sleep_level must be 0, 1 or 2, got {self.sleep_level}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"rollout.dtype must be auto, float32 or bfloat16, got {self.dtype!r}")

    def check_engine(self, student: ModelConfig, runtime: Runtime) -> None:
        """The vLLM engine's start-up requirements, before any model is built."""
        if self.engine != "vllm":
            return
        from megatron_dgrpo.rollout.vllm_engine import (
            cpu_attention_head_dims,
            require_engine_package,
        )

        try:
            require_engine_package()
        except RuntimeError as exc:
            raise ValueError(f"rollout.engine=vllm: {exc}") from None
        if not runtime.cuda and student.head_dim not in cpu_attention_head_dims():
            raise ValueError(
                f"rollout.engine=vllm: the student's head_dim {student.head_dim} is not "
                f"supported by vLLM's CPU attention (supported: "
                f"{', '.join(map(str, cpu_attention_head_dims()))}); use rollout.engine=embedded "
                f"or a model with head_dim >= 32 (e.g. the small-qwen3 preset)")


@dataclass
class RunConfig:
    """Everything one training run needs; see the module docstring for the YAML shape."""

    run_dir: str = "runs/dgrpo"
    seed: int = 1234
    steps: int = 10
    prompts_per_step: int = 4  # per data-parallel rank; x sampling.n sequences on-policy
    # Sequences per forward/backward on each DP rank (gradients accumulate over them);
    # None: the rank's whole batch at once. Long contexts need 1.
    micro_batch_size: int | None = None
    save_every: int = 5
    keep_last: int = 2
    tokenizer: str = ""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    student: ModelSource = field(default_factory=ModelSource)
    teacher: ModelSource | None = None
    teacher_topk_cache: str | None = None  # `dgrpo teacher-cache` output, for kd with top-k KL
    loss: LossConfig = field(default_factory=LossConfig)
    # fused: loss from final hidden states chunk by chunk (parallel/fused.py), never
    # [tokens x vocab] logits; materialized: full logits (parallel/materialized.py), the
    # plain reference path. Both give the same loss and gradients for every objective.
    loss_impl: Literal["fused", "materialized"] = "fused"
    loss_chunk_tokens: int | None = None  # fused: tokens per chunk (None: ~128 MiB of logits)
    loss_fp8: Fp8LossConfig | None = None  # fused: FP8 output-layer GEMMs (parallel/fp8.py)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(n=4))
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: LongBlocksConfig = field(default_factory=LongBlocksConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self, runtime: Runtime | None = None) -> None:
        """Cross-section checks (each section validated itself already)."""
        from megatron_dgrpo.models.provider import validate_for_runtime

        runtime = runtime or Runtime.detect()
        for name in ("steps", "prompts_per_step", "save_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens < 1:
            raise ValueError(f"loss_chunk_tokens must be >= 1, got {self.loss_chunk_tokens}")
        if self.loss_fp8 is not None and self.loss_impl != "fused":
            raise ValueError("loss_fp8 runs the fused loss's output-layer GEMMs in FP8; "
                             "loss_impl=materialized has none: use loss_impl=fused")
        if not self.tokenizer:
            raise ValueError("tokenizer must name an HF tokenizer directory or a sentencepiece "
                             ".model file")
        objective = self.loss.objective
        if self.parallel.pipeline_parallel != 1:
            raise ValueError("the trainer runs with parallel.pipeline_parallel=1 for now "
                             "(pipeline-parallel training is not implemented yet)")
        if self.optim.clip_grad > 0 and not runtime.cuda:
            raise ValueError("optim.clip_grad > 0 needs CUDA (Megatron's clipping asserts CUDA "
                             "tensors); set optim.clip_grad=0 on CPU")
        if objective in ON_POLICY_OBJECTIVES and objective != "opd" and self.sampling.n < 2:
            raise ValueError(f"{objective} needs sampling.n >= 2 responses per prompt for group "
                             f"advantages, got {self.sampling.n}")
        student = self.student.model_config()
        validate_for_runtime(student, self.parallel, runtime)
        if self.loss_fp8 is not None:
            self._check_loss_fp8(student, runtime)
        if self.rollout.engine != "embedded" and objective not in ON_POLICY_OBJECTIVES:
            raise ValueError(f"rollout.engine={self.rollout.engine} samples rollouts, but "
                             f"loss.objective={objective} trains on fixed sequences; use "
                             f"rollout.engine=embedded (the default)")
        self.rollout.check_engine(student, runtime)
        longest = self.data.max_prompt_tokens + self.sampling.max_new_tokens
        if self.rollout.engine == "vllm" and longest > student.max_position_embeddings:
            raise ValueError(
                f"data.max_prompt_tokens + sampling.max_new_tokens = {longest} exceeds the "
                f"student's max_position_embeddings ({student.max_position_embeddings}), which "
                f"vLLM enforces; shorten them or raise model.max_position_embeddings")
        if self.teacher_topk_cache is not None:
            if objective != "kd" or self.loss.resolved_kl_estimator != "topk":
                raise ValueError("teacher_topk_cache serves loss.objective=kd with "
                                 "loss.kl_estimator=topk (cached sequences are fixed)")
        elif objective in TEACHER_OBJECTIVES:
            if self.teacher is None:
                raise ValueError(f"loss.objective={objective} needs a teacher section")
            teacher = self.teacher.model_config()
            validate_for_runtime(teacher, self.parallel, runtime)
            if teacher.vocab_size != student.vocab_size:
                raise ValueError(
                    f"teacher vocabulary ({teacher.vocab_size}) differs from the student's "
                    f"({student.vocab_size}): token-level guidance needs one tokenizer")
            if self.loss.resolved_kl_estimator == "topk" and self.teacher.engine == "megatron":
                raise ValueError(
                    "loss.kl_estimator=topk reads the teacher's top-k log-probs, which come "
                    "from teacher.engine=vllm or teacher_topk_cache (kd); the Megatron teacher "
                    "gives full logits: use kl_estimator=full (exact) or a sampled estimator")

        if self.student.offload:
            raise ValueError("student.offload: only the frozen teacher can be offloaded "
                             "(the student trains every step)")
        if self.student.engine != "megatron":
            raise ValueError("student.engine: only the teacher can be served by vLLM "
                             "(teacher.engine=vllm); the student trains in Megatron")
        if self.uses_vllm_teacher():
            self._check_vllm_teacher(runtime)
        if (self.parallel.context_parallel > 1 and objective in ON_POLICY_OBJECTIVES
                and self.rollout.engine == "embedded"):
            raise ValueError(
                "parallel.context_parallel > 1 with rollout.engine=embedded: the embedded "
                "engine decodes whole sequences on each rank and cannot run a context-parallel "
                "model; use rollout.engine=vllm")

    def _check_loss_fp8(self, student: ModelConfig, runtime: Runtime) -> None:
        """``loss_fp8``: output layers whose shapes FP8 GEMMs take, on a GPU that has them."""
        tp = self.parallel.tensor_parallel
        models = [("student", student)]
        if self.loss_fp8.teacher and self.teacher is not None and self.teacher.engine == "megatron":
            models.append(("teacher", self.teacher.model_config()))
        for what, model in models:
            check_fp8_shapes(model.hidden_size, model.padded_vocab_size(tp) // tp, what)
        reason = fp8_unsupported_reason(runtime.cuda_capability)
        if reason is not None:
            raise ValueError(f"loss_fp8: {reason}")

    def _check_vllm_teacher(self, runtime: Runtime) -> None:
        """``teacher.engine=vllm``: what the engine can serve, and its start-up requirements."""
        from megatron_dgrpo.rollout.vllm_engine import (
            cpu_attention_head_dims,
            require_engine_package,
        )

        teacher, loss = self.teacher, self.loss
        if self.teacher_topk_cache is not None:
            raise ValueError("teacher.engine=vllm and teacher_topk_cache are two teacher "
                             "sources; keep one")
        if teacher.offload:
            raise ValueError("teacher.offload offloads the Megatron teacher; with "
                             "teacher.engine=vllm there is none (set teacher.offload=false)")
        if teacher.topk < 1:
            raise ValueError(f"teacher.topk must be >= 1, got {teacher.topk}")
        if loss.form != "advantage" and loss.resolved_kl_estimator == "full":
            raise ValueError(
                f"teacher.engine=vllm serves top-k log-probs, not full teacher logits: set "
                f"loss.kl_estimator to topk, k1, k2 or k3 (loss.objective={loss.objective} "
                f"defaults to full), or use teacher.engine=megatron")
        try:
            require_engine_package()
        except RuntimeError as exc:
            raise ValueError(f"teacher.engine=vllm: {exc}") from None
        config = teacher.model_config()
        if not runtime.cuda and config.head_dim not in cpu_attention_head_dims():
            raise ValueError(
                f"teacher.engine=vllm: the teacher's head_dim {config.head_dim} is not "
                f"supported by vLLM's CPU attention (supported: "
                f"{', '.join(map(str, cpu_attention_head_dims()))}); use teacher.engine=megatron")
        if self.loss.objective in ON_POLICY_OBJECTIVES:
            longest = self.data.max_prompt_tokens + self.sampling.max_new_tokens
            if longest > config.max_position_embeddings:
                raise ValueError(
                    f"data.max_prompt_tokens + sampling.max_new_tokens = {longest} exceeds the "
                    f"teacher's max_position_embeddings ({config.max_position_embeddings}), "
                    f"which vLLM enforces")

    def teacher_max_model_len(self) -> int:
        """Longest sequence the vLLM teacher must score: prompt + response budget on-policy;
        the teacher's own limit for fixed sequences (SFT/KD answers have no budget)."""
        if self.loss.objective in ON_POLICY_OBJECTIVES:
            return self.data.max_prompt_tokens + self.sampling.max_new_tokens
        return self.teacher.model_config().max_position_embeddings

    def uses_vllm_teacher(self) -> bool:
        """The teacher is read (objective) and served by vLLM (``teacher.engine=vllm``)."""
        return (self.loss.objective in TEACHER_OBJECTIVES and self.teacher is not None
                and self.teacher.engine == "vllm")

    def needs_teacher_model(self) -> bool:
        """A live teacher runs unless a top-k cache stands in for it (KD)."""
        return self.loss.objective in TEACHER_OBJECTIVES and self.teacher_topk_cache is None

    def needs_reference(self) -> bool:
        """A frozen copy of the initial student is the KL anchor of GRPO (and optionally dGRPO)."""
        return ((self.loss.objective == "grpo" and self.loss.kl_coef > 0)
                or (self.loss.objective == "dgrpo" and self.loss.ref_kl_coef > 0))
