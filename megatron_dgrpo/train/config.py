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

from megatron_dgrpo.algorithms.objectives import LossConfig
from megatron_dgrpo.data.longblocks import LongBlocksConfig
from megatron_dgrpo.data.rewards import RewardConfig
from megatron_dgrpo.models.config import ModelConfig, ParallelConfig, Runtime
from megatron_dgrpo.models.presets import get_preset
from megatron_dgrpo.rollout.engine import SamplingParams

# Objectives that read the teacher, and those that sample rollouts.
TEACHER_OBJECTIVES = ("kd", "opd", "dgrpo")
ON_POLICY_OBJECTIVES = ("grpo", "opd", "dgrpo")


@dataclass
class ModelSource:
    """A model: its architecture (a preset, or explicit hyper-parameters) and its weights.

    ``init_from``: a Megatron checkpoint directory (``dgrpo convert hf-to-megatron`` output,
    or ``RUN_DIR/checkpoints/step_N/model`` of an earlier run); its stored config wins over
    ``preset``/``model``. Without it the weights are random (tests, smoke runs).
    """

    preset: str | None = "tiny-qwen3"
    model: ModelConfig | None = None
    init_from: str | None = None

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
    """Adam(W) through Megatron's optimizer (plain, non-distributed on CPU)."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = 0.0  # Megatron's clipping asserts CUDA tensors: keep 0 on CPU

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.clip_grad < 0:
            raise ValueError(f"optim.clip_grad must be >= 0, got {self.clip_grad}")


@dataclass
class RunConfig:
    """Everything one training run needs; see the module docstring for the YAML shape."""

    run_dir: str = "runs/dgrpo"
    seed: int = 1234
    steps: int = 10
    prompts_per_step: int = 4
    save_every: int = 5
    keep_last: int = 2
    tokenizer: str = ""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    student: ModelSource = field(default_factory=ModelSource)
    teacher: ModelSource | None = None
    teacher_topk_cache: str | None = None  # `dgrpo teacher-cache` output, for kd with top-k KL
    loss: LossConfig = field(default_factory=LossConfig)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(n=4))
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

    def needs_teacher_model(self) -> bool:
        """A live teacher runs unless a top-k cache stands in for it (KD)."""
        return self.loss.objective in TEACHER_OBJECTIVES and self.teacher_topk_cache is None

    def needs_reference(self) -> bool:
        """A frozen copy of the initial student is the KL anchor of GRPO (and optionally dGRPO)."""
        return ((self.loss.objective == "grpo" and self.loss.kl_coef > 0)
                or (self.loss.objective == "dgrpo" and self.loss.ref_kl_coef > 0))
