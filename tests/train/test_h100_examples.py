"""The H100 example configs load through the real config loader and validate against a
CUDA + Transformer Engine runtime (so a typo or an impossible layout fails CI), and are
refused on this CPU runtime with a message naming the reason. On the declared CUDA runtime
validation runs the per-GPU memory arithmetic for real (megatron_dgrpo/train/memory.py):
every example fits, and the layouts they replaced are refused naming the term."""

from pathlib import Path

import pytest

from megatron_dgrpo.config import ConfigError, load_config
from megatron_dgrpo.models.config import Runtime
from megatron_dgrpo.train.config import RunConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SMALL = EXAMPLES / "h100_qwen3_1.7b_student_8b_teacher_32k.yaml"
MEDIUM = EXAMPLES / "h100_qwen3_8b_student_32b_teacher_32k.yaml"
LARGE = EXAMPLES / "h100_qwen3_8b_student_32b_teacher_128k.yaml"
PAPER = EXAMPLES / "h100_qwen3_1.7b_student_32b_teacher_128k.yaml"
GPUS = {SMALL: 8, MEDIUM: 16, LARGE: 64, PAPER: 16}  # the world sizes the files lay out
ALL = [SMALL, MEDIUM, LARGE, PAPER]
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
    engine_tp = config.rollout.engine_tensor_parallel
    assert engine_tp <= min(8, parallel.model_parallel_size)  # the replica's GPUs, one node
    assert config.rollout.max_num_seqs is not None
    assert config.parallel.gpu_memory_gib == 79
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


def test_the_papers_pair_at_128k(monkeypatch):
    config = _load(monkeypatch, PAPER, CUDA)
    _check_layout(config, GPUS[PAPER])
    student, teacher = config.student.model_config(), config.teacher.model_config()
    assert (student.num_layers, student.hidden_size, student.ffn_hidden_size) == (28, 2048, 6144)
    assert (teacher.num_layers, teacher.hidden_size, teacher.ffn_hidden_size) == (64, 5120, 25600)
    for model in (student, teacher):
        assert model.max_position_embeddings == 131072
        assert (model.yarn_factor, model.yarn_original_max_position_embeddings) == (4.0, 32768)
    assert config.data.max_prompt_tokens + config.sampling.max_new_tokens == 131072
    assert config.sampling.n == 8 and config.loss.kl_coef == 0.5
    assert config.loss.eps_low == config.loss.eps_high == 0.2
    assert config.parallel.context_parallel == 2 and config.teacher.offload


@pytest.mark.parametrize("path", ALL)
def test_every_example_fits_by_the_memory_arithmetic(monkeypatch, path):
    plan = _load(monkeypatch, path, CUDA).memory_plan(CUDA)
    phases = {budget.phase: budget for budget in plan.budgets}
    assert set(phases) == {"rollout and refit", "training", "vLLM rollout engine"}
    for budget in plan.budgets:
        assert budget.fits and 0 < budget.total <= budget.capacity, plan.summary()
    assert phases["training"].capacity == 79 * 2 ** 30


def test_validation_runs_the_memory_check_on_the_declared_cuda_runtime(monkeypatch):
    with pytest.raises(ValueError, match="the training phase needs .* of GPU 40.00 GiB"):
        _load(monkeypatch, MEDIUM, CUDA, "parallel.gpu_memory_gib=40")
    with pytest.raises(ValueError, match="parallel.gpu_memory_gib: the memory check of a CUDA "
                                         "run needs the GPUs' memory"):
        _load(monkeypatch, MEDIUM, CUDA, "parallel.gpu_memory_gib=null")


def test_the_replaced_128k_engine_layout_is_refused_naming_the_kv_cache(monkeypatch):
    """What this file had before: a TP=1 engine at gpu_memory_utilization 0.35 (27.65 GiB)
    for 15.3 GiB of weights and 18 GiB of KV cache per 128K sequence."""
    with pytest.raises(ValueError) as info:
        _load(monkeypatch, LARGE, CUDA, "rollout.engine_tensor_parallel=1",
              "rollout.max_num_seqs=null")
    message = str(info.value)
    assert "the vLLM rollout engine phase needs 35.32 GiB of gpu_memory_utilization x GPU = " \
           "27.65 GiB" in message, message
    assert "largest term: vLLM rollout engine KV cache (1 x 131072 tokens; max_num_seqs " \
           "unset) = 18.00 GiB" in message
    assert "vLLM rollout engine weights (engine TP 1 shard) 15.26 GiB" in message


@pytest.mark.parametrize("path", ALL)
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
    ("rollout.engine_tensor_parallel=3", "engine tensor parallel 3 does not split the model"),
    ("rollout.engine_tensor_parallel=16", "exceeds the GPUs of one model replica (TP x CP x "
                                          "PP = 4)"),
    ("rollout.max_num_seqs=64", "the vLLM rollout engine phase needs"),
    ("rollout.verify_decode_tokens=4096", "rollout.verify_decode_tokens (4096) exceeds "
                                          "sampling.max_new_tokens (2048)"),
])
def test_mistakes_in_an_example_fail(monkeypatch, override, message):
    with pytest.raises((ValueError, ConfigError)) as info:
        _load(monkeypatch, SMALL, CUDA, override)
    assert message in str(info.value)


@pytest.mark.parametrize("path", ALL)
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
