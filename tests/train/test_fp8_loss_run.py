"""`dgrpo train` with the fused loss's output-layer GEMMs in FP8 (``loss_fp8``) against the
same run in float32: a short dGRPO run (tiny-qwen3 student, small-qwen3 teacher, embedded
rollouts, full-vocabulary KL) stays within the measured band, and bad configs are refused.

Reference: the float32 run from the same weights, data and seeds. Step 1 trains on the same
rollouts, so its difference is the FP8 error alone; later steps also sample from weights
that have drifted apart.
"""

import dataclasses

import pytest

from megatron_dgrpo.config import from_dict
from megatron_dgrpo.models.config import Runtime
from megatron_dgrpo.models.presets import get_preset
from megatron_dgrpo.parallel.launch import run_distributed
from megatron_dgrpo.testing.runs import train_runs
from megatron_dgrpo.train.config import RunConfig
from megatron_dgrpo.train.metrics import read_metrics

STEPS = 3
# Measured (CPU, torch 2.13.0+cpu): |FP8 - fp32| per step, both recipes (identical), hybrid
# format: step 1 loss 4.6e-6 on a loss of 1.7e-3, policy/kl_teacher 1.2e-4 nats on a KL of
# 0.044 nats; steps 2-3 loss <= 8.0e-6, KL <= 2.0e-4 nats. (The random tiny models' logits
# are small, so their distributions are near uniform: the realistic-scale FP8 error is
# measured in tests/parallel/test_fp8_loss.py.) Bounds 2.5x.
STEP1_BANDS = {"loss": 1.2e-5, "policy/kl_teacher": 3e-4}
BANDS = {"loss": 2e-5, "policy/kl_teacher": 5e-4}


@pytest.fixture(scope="module")
def setup(make_synth_setup):
    return make_synth_setup("fp8-loss", num=8, seed=3)


def _config(setup, run_name, **top_level):
    root, tokenizer_dir, vocab = setup
    student = dataclasses.asdict(dataclasses.replace(get_preset("tiny-qwen3"), vocab_size=vocab))
    teacher = dataclasses.asdict(dataclasses.replace(get_preset("small-qwen3"), vocab_size=vocab))
    return {"run_dir": str(root / run_name), "steps": STEPS, "save_every": STEPS,
            "prompts_per_step": 2, "tokenizer": str(tokenizer_dir),
            "student": {"preset": None, "model": student},
            "teacher": {"preset": None, "model": teacher},
            "loss": {"objective": "dgrpo", "kl_estimator": "full", "kl_coef": 0.04},
            "sampling": {"n": 2, "max_new_tokens": 8, "temperature": 1.0},
            "data": {"paths": [str(root / "data")], "max_prompt_tokens": 4096},
            "optim": {"lr": 1e-3}, **top_level}


@pytest.mark.multiproc
def test_fp8_loss_dgrpo_run_stays_within_the_band_of_the_float32_run(setup):
    configs = {"fp32": _config(setup, "fp32"),
               "tensorwise": _config(setup, "fp8-tensorwise", loss_fp8={"recipe": "tensorwise"}),
               "rowwise": _config(setup, "fp8-rowwise", loss_fp8={"recipe": "rowwise"})}
    assert run_distributed(train_runs, 1, args=(list(configs.values()),)) == [[0, 0, 0]]
    records = {name: read_metrics(config["run_dir"]) for name, config in configs.items()}
    for recipe in ("tensorwise", "rowwise"):
        assert [r["step"] for r in records[recipe]] == list(range(1, STEPS + 1))
        for fp8, fp32 in zip(records[recipe], records["fp32"]):
            differences = {key: abs(fp8[key] - fp32[key]) for key in BANDS}
            print(f"{recipe} step {fp8['step']}: loss {fp32['loss']:.5f} KL "
                  f"{fp32['policy/kl_teacher']:.4f}; |FP8 - fp32| "
                  + ", ".join(f"{key} {value:.2e}" for key, value in differences.items()))
            bands = STEP1_BANDS if fp8["step"] == 1 else BANDS
            for key, value in differences.items():
                assert value <= bands[key], (recipe, fp8["step"], key, value)


CPU = Runtime(cuda=False, transformer_engine=False)


@pytest.mark.parametrize("change, message", [
    ({"loss_fp8": {"recipe": "tensorwise"}, "loss_impl": "materialized"},
     "loss_fp8 runs the fused loss's output-layer GEMMs in FP8; loss_impl=materialized has "
     "none: use loss_impl=fused"),
    ({"loss_fp8": {"recipe": "blockwise"}},
     "loss_fp8.recipe: 'blockwise' is not one of ['tensorwise', 'rowwise']"),
    ({"loss_fp8": {"format": "e5m2"}}, "loss_fp8.format: 'e5m2' is not one of ['hybrid', 'e4m3']"),
])
def test_bad_fp8_loss_configs_are_refused(setup, change, message):
    with pytest.raises(ValueError) as err:
        from_dict(RunConfig, _config(setup, "refused", **change)).validate(CPU)
    assert message in str(err.value)


def test_fp8_loss_refuses_output_layers_fp8_gemms_cannot_take(setup):
    config = _config(setup, "refused", loss_fp8={})
    config["student"]["model"].update(hidden_size=72, num_attention_heads=4, head_dim=18)
    with pytest.raises(ValueError, match=r"the student output layer is \[512, 72\] per TP rank; "
                                         "FP8 GEMMs need the hidden size"):
        from_dict(RunConfig, config).validate(CPU)


def test_fp8_loss_refuses_gpus_without_fp8_gemms(setup):
    a100 = Runtime(cuda=True, transformer_engine=False, cuda_capability=(8, 0))
    with pytest.raises(ValueError, match=r"loss_fp8: FP8 GEMMs need a GPU of compute "
                                         r"capability >= 8.9 \(Ada, Hopper or newer\); this "
                                         r"one has 8.0"):
        from_dict(RunConfig, _config(setup, "refused", loss_fp8={},
                                     parallel={"gpu_memory_gib": 79.0})).validate(a100)
    h100 = Runtime(cuda=True, transformer_engine=False, cuda_capability=(9, 0))
    from_dict(RunConfig, _config(setup, "accepted", loss_fp8={},
                                 parallel={"gpu_memory_gib": 79.0})).validate(h100)
