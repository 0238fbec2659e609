"""The H100 example configs load through the real config loader and validate against a
CUDA + Transformer Engine runtime (so a typo or an impossible layout fails CI), and are
refused on this CPU runtime with a message naming the reason."""

from pathlib import Path

import pytest

from megatron_dgrpo.config import ConfigError, load_config
from megatron_dgrpo.models.config import Runtime
from megatron_dgrpo.train.config import RunConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SMALL = EXAMPLES / "h100_qwen3_1.7b_student_8b_teacher_32k.yaml"
MEDIUM = EXAMPLES / "h100_qwen3_8b_student_32b_teacher_32k.yaml"
LARGE = EXAMPLES / "h100_qwen3_8b_student_32b_teacher_128k.yaml"
GPUS = {SMALL: 8, MEDIUM: 16, LARGE: 64}  # the world sizes the files' comments lay out
CUDA = Runtime(cuda=True, transformer_engine=True)
CPU = Runtime(cuda=False, transformer_engine=False)
# Checkpoints do not exist in CI: the presets stand in for their stored configs.
NO_CHECKPOINTS = ["student.init_from=null", "teacher.init_from=null"]


def _load(monkeypatch, path, runtime, *overrides):
    monkeypatch.setattr(Runtime, "detect", staticmethod(lambda: runtime))
    return load_config(RunConfig, path, [*NO_CHECKPOINTS, *overrides])


def _check_layout(config: RunConfig, gpus: int):
    parallel = config.parallel
    assert gpus % parallel.model_parallel_size == 0
    assert parallel.tensor_parallel <= 8  # a TP group stays inside one 8-GPU node
    assert parallel.pipeline_parallel == 1
    assert config.loss_impl == "fused" and config.rollout.engine == "vllm"
    assert config.micro_batch_size == 1
    assert not config.student.offload
    for source in (config.student, config.teacher):
        assert source.model_config().params_dtype == "bf16"
    assert (config.data.max_prompt_tokens + config.sampling.max_new_tokens
            <= config.student.model_config().max_position_embeddings)


@pytest.mark.parametrize("path, student_hidden, teacher_hidden", [
    (SMALL, 2048, 4096),   # qwen3-1.7b, qwen3-8b
    (MEDIUM, 4096, 5120),  # qwen3-8b, qwen3-32b
])
def test_32k_examples_are_valid_on_cuda(monkeypatch, path, student_hidden, teacher_hidden):
    config = _load(monkeypatch, path, CUDA)
    _check_layout(config, GPUS[path])
    assert config.student.model_config().hidden_size == student_hidden
    assert config.teacher.model_config().hidden_size == teacher_hidden
    assert config.data.max_prompt_tokens + config.sampling.max_new_tokens == 32768


def test_128k_example_is_valid_on_cuda_with_context_parallelism(monkeypatch):
    config = _load(monkeypatch, LARGE, CUDA)
    _check_layout(config, GPUS[LARGE])
    parallel, student = config.parallel, config.student.model_config()
    assert parallel.context_parallel == 4 and parallel.cp_comm_type == "p2p"
    assert config.data.max_prompt_tokens + config.sampling.max_new_tokens == 131072
    # Each CP rank holds 2 load-balanced chunks, each split over TP by sequence parallelism.
    assert 131072 % (2 * parallel.context_parallel * parallel.tensor_parallel) == 0
    for model in (student, config.teacher.model_config()):
        assert model.max_position_embeddings == 131072
        assert (model.yarn_factor, model.yarn_original_max_position_embeddings) == (4.0, 32768)
    with pytest.raises(ValueError, match="cannot run a context-parallel model; use "
                                         "rollout.engine=vllm"):
        _load(monkeypatch, LARGE, CUDA, "rollout.engine=embedded")


@pytest.mark.parametrize("path", [SMALL, MEDIUM, LARGE])
def test_examples_are_refused_on_cpu_with_the_reason(monkeypatch, path):
    with pytest.raises(ValueError, match="needs Transformer Engine on CUDA; this machine has no CUDA"):
        _load(monkeypatch, path, CPU)


@pytest.mark.parametrize("override, message", [
    ("parallel.tensor_paralel=4", "unknown config key(s) parallel.tensor_paralel"),
    ("parallel.tensor_parallel=3", "not divisible by parallel.tensor_parallel (3)"),
    ("loss_impl=fuzed", "'fuzed' is not one of ['fused', 'materialized']"),
    ("rollout.engine=vlm", "'vlm' is not one of ['embedded', 'vllm']"),
    ("optim.decay=cosin", "'cosin' is not one of"),
    ("sampling.max_new_tokens=20000", "exceeds the student's max_position_embeddings"),
])
def test_mistakes_in_an_example_fail(monkeypatch, override, message):
    with pytest.raises((ValueError, ConfigError)) as info:
        _load(monkeypatch, SMALL, CUDA, override)
    assert message in str(info.value)


@pytest.mark.parametrize("path", [SMALL, MEDIUM, LARGE])
def test_examples_set_no_option_that_has_no_effect(monkeypatch, path):
    assert _load(monkeypatch, path, CUDA).notices() == []


@pytest.mark.parametrize("overrides, notice", [
    (["ppo_mini_batches=1"], "loss.eps_high has no effect here: with one optimizer step"),
    (["loss.objective=opd"], "loss.kl_coef has no effect here: loss.objective=opd has no KL "
                             "term weighted by kl_coef"),
    (["loss.kl_estimator=k2", "loss.ref_kl_coef=0.1", "loss.ref_kl_estimator=k3"],
     "loss.ref_kl_estimator=k3 follows the verl / DeepSeek-R1 convention"),
])
def test_inert_or_surprising_options_are_reported_at_start_up(monkeypatch, overrides, notice):
    notes = _load(monkeypatch, MEDIUM, CUDA, *overrides).notices()
    assert any(notice in note for note in notes), notes
