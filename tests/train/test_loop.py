"""`dgrpo train` on real TP=2 ranks: every objective trains, resume is exact, bad configs are
refused before any work.

Exactness reference: an uninterrupted run. A run stopped after step 1 and restarted must log
the same metrics (timings aside) and end with bit-identical weights.
"""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_dgrpo.algorithms.objectives import get_objective
from megatron_dgrpo.config import from_dict
from megatron_dgrpo.models.presets import get_preset
from megatron_dgrpo.parallel.launch import run_distributed
from megatron_dgrpo.train.config import RunConfig
from megatron_dgrpo.train.metrics import read_metrics

OBJECTIVES = ("sft", "kd", "grpo", "opd", "dgrpo")
NON_DETERMINISTIC = ("time/", "throughput/", "memory/")


@pytest.fixture(scope="module")
def setup(make_synth_setup):
    return make_synth_setup("train", num=8, seed=3)


def _config(setup, objective, run_name, steps=2, **top_level):
    root, tokenizer_dir, vocab = setup
    student = dataclasses.asdict(dataclasses.replace(get_preset("tiny-qwen3"), vocab_size=vocab))
    teacher = dataclasses.asdict(dataclasses.replace(get_preset("small-qwen3"), vocab_size=vocab))
    config = {"run_dir": str(root / run_name), "steps": steps, "save_every": 1, "keep_last": 5,
              "prompts_per_step": 2, "tokenizer": str(tokenizer_dir),
              "parallel": {"tensor_parallel": 2},
              "student": {"preset": None, "model": student},
              "loss": {"objective": objective},
              "sampling": {"n": 2, "max_new_tokens": 4, "temperature": 1.0},
              "data": {"paths": [str(root / "data")], "max_prompt_tokens": 4096},
              "optim": {"lr": 1e-3}, **top_level}
    if get_objective(objective).needs_teacher:
        config["teacher"] = {"preset": None, "model": teacher}
    if objective == "grpo":
        config["loss"]["kl_coef"] = 0.1  # exercise the frozen reference
        config["rewards"] = {"per_task": {}, "default": "test_answer_length_parity"}
    return config


def _train(rank, world_size, config_dict):
    from megatron_dgrpo.data.rewards import register_reward
    from megatron_dgrpo.train.runner import run_training

    # A random tiny model never answers correctly; this reward varies across the group so
    # that advantages, and thus GRPO's gradient, are not all zero.
    register_reward("test_answer_length_parity")(lambda answer, reference: float(len(answer) % 2))
    return run_training(from_dict(RunConfig, config_dict), show_progress=False)


def _final_weights(run_dir, step):
    shard = f"{run_dir}/checkpoints/step_{step:08d}/model"
    return {f"{tp}/{k}": v for tp in range(2)
            for k, v in load_file(f"{shard}/mp_rank_{tp:02d}_000/model.safetensors").items()}


@pytest.mark.multiproc
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_objective_trains_at_tp2(setup, objective):
    config = _config(setup, objective, f"run-{objective}")
    assert run_distributed(_train, 2, args=(config,)) == [0, 0]
    records = read_metrics(config["run_dir"])
    assert [r["step"] for r in records] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    before, after = _final_weights(config["run_dir"], 1), _final_weights(config["run_dir"], 2)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the step moved weights
    first = records[0]
    assert first["throughput/train_tokens_per_s"] > 0 and first["memory/peak_rss_gb"] > 0
    if objective in ("grpo", "opd", "dgrpo"):
        assert 0.0 <= first["reward/mean"] <= 1.0
        assert 0 < first["response/length_mean"] <= first["response/length_max"] <= 4
        assert 0.0 <= first["response/truncated_frac"] <= 1.0
        assert first["throughput/rollout_tokens_per_s"] > 0
        families = {k[len("pass_rate/"):] for k in first if k.startswith("pass_rate/")}
        assert families  # the synthetic tasks carry their family
        for family in families:
            assert 0.0 <= first[f"pass_rate/{family}"] <= 1.0
            assert 0.0 <= first[f"reward/{family}/mean"] <= 1.0 and first[f"reward/{family}/std"] >= 0
    if objective in ("grpo", "dgrpo"):
        for name in ("clip_frac_low", "clip_frac_high", "ratio_min", "ratio_max", "is_ratio_mean",
                     "is_capped_frac", "entropy"):
            assert math.isfinite(first[f"policy/{name}"]), name
    if objective == "grpo":
        assert first["policy/kl_ref"] >= 0  # the frozen reference is on (kl_coef 0.1)
    if objective == "kd":
        assert records[0]["policy/kl_teacher_forward"] > 0
    if objective in ("opd", "dgrpo"):
        assert records[0]["policy/kl_teacher"] > 0


@pytest.mark.multiproc
@pytest.mark.parametrize("objective", ["sft", "dgrpo"])
def test_interrupted_run_resumes_exactly(setup, objective):
    """SFT reads the data shuffled (``data.shuffle_buffer``: the order is in the checkpoint)
    and crosses an epoch (9 of the 8 examples), dGRPO reads it in file order."""
    straight = _config(setup, objective, f"straight-{objective}", steps=3)
    interrupted = _config(setup, objective, f"interrupted-{objective}", steps=1)
    if objective == "sft":
        for config in (straight, interrupted):
            config["data"]["shuffle_buffer"] = 8  # every example of the set
            config["prompts_per_step"] = 3
    assert run_distributed(_train, 2, args=(straight,)) == [0, 0]
    assert run_distributed(_train, 2, args=(interrupted,)) == [0, 0]
    assert run_distributed(_train, 2, args=({**interrupted, "steps": 3},)) == [0, 0]

    def comparable(run_dir):
        return [{k: v for k, v in r.items() if k != "time" and not k.startswith(NON_DETERMINISTIC)}
                for r in read_metrics(run_dir)]

    assert comparable(interrupted["run_dir"]) == comparable(straight["run_dir"])
    expected, got = _final_weights(straight["run_dir"], 3), _final_weights(interrupted["run_dir"], 3)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("change, message", [
    ({"stepz": 3}, "unknown config key(s) stepz"),
    ({"loss": {"objective": "dgrpo"}, "teacher": None}, "needs a teacher section"),
    ({"loss": {"objective": "ppo"}}, "ppo"),
    ({"optim": {"clip_grad": 1.0}}, "clip_grad > 0 needs CUDA"),
    ({"parallel": {"tensor_parallel": 2, "context_parallel": 2}},
     "context parallelism with cp_comm_type=p2p needs Transformer Engine on CUDA"),
    ({"parallel": {"context_parallel": 2, "cp_comm_type": "allgather"}},
     "embedded engine decodes whole sequences on each rank and cannot run a context-parallel"),
    ({"loss": {"objective": "grpo"}, "sampling": {"n": 1}}, "sampling.n >= 2"),
    # rollout seeds derive from the run seed, the step and the replica: no second seed
    ({"sampling": {"n": 2, "seed": 7}}, "unknown config key(s) sampling.seed"),
    ({"parallel": {"tensor_parallel": 3}}, "divisible"),
    ({"teacher_topk_cache": "cache/"}, "teacher_topk_cache serves loss.objective=kd"),
])
def test_bad_run_configs_are_refused_before_any_work(setup, change, message):
    config = {**_config(setup, "dgrpo", "never-created"), **change}
    with pytest.raises(ValueError) as info:
        from_dict(RunConfig, config)
    assert message in str(info.value)
    assert not (setup[0] / "never-created").exists()


def test_teacher_with_another_vocabulary_is_refused(setup):
    config = _config(setup, "dgrpo", "never-created")
    config["teacher"]["model"]["vocab_size"] += 128
    with pytest.raises(ValueError, match="teacher vocabulary .* differs from the student's"):
        from_dict(RunConfig, config)


def _train_each(rank, world_size, config_dicts):
    """Several runs one after the other in the same ranks (saves a process start each)."""
    from megatron_dgrpo.models.provider import destroy_parallel

    codes = []
    for config_dict in config_dicts:
        codes.append(_train(rank, world_size, config_dict))
        destroy_parallel()
    return codes


def _comparable(record):
    """The metrics a step's numerics fix (not the padding of its micro-batch layout)."""
    return {k: v for k, v in record.items() if k not in ("time", "train/padding_fraction")
            and not k.startswith(NON_DETERMINISTIC)}


@pytest.mark.multiproc
@pytest.mark.parametrize("objective", ["sft", "dgrpo"])
def test_fused_loss_step_equals_materialized_step(setup, objective):
    """One TP=2 step with loss_impl=fused (hidden states, chunked, padded vocabulary masked
    inside the loss, output/embedding weight gradient handed to DDP), one sequence per
    micro-batch, against the same step with full logits of the whole batch at once: loss,
    every metric and every updated weight agree to fp32 rounding."""
    _, _, vocab = setup
    assert get_preset("tiny-qwen3").padded_vocab_size(2) > vocab  # the padding is exercised
    # Adam's first step is ~lr * sign(grad): lr 1e-4 keeps the rounding of near-zero
    # gradients (amplified by Adam's normalisation) below the 1e-5 weight tolerance.
    optim = {"lr": 1e-4}
    fused = _config(setup, objective, f"fused-{objective}", steps=1, loss_impl="fused",
                    loss_chunk_tokens=7,  # several chunks, the last one ragged
                    micro_batch_size=1, optim=optim)  # and gradient accumulation
    materialized = _config(setup, objective, f"materialized-{objective}", steps=1,
                           loss_impl="materialized", optim=optim)
    assert run_distributed(_train_each, 2, args=([fused, materialized],)) == [[0, 0], [0, 0]]
    (got,), (expected,) = read_metrics(fused["run_dir"]), read_metrics(materialized["run_dir"])
    got, expected = _comparable(got), _comparable(expected)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    got_weights = _final_weights(fused["run_dir"], 1)
    expected_weights = _final_weights(materialized["run_dir"], 1)
    assert got_weights.keys() == expected_weights.keys()
    for key in expected_weights:
        torch.testing.assert_close(got_weights[key], expected_weights[key], rtol=0, atol=1e-5,
                                   msg=key)


def test_the_cpu_example_sets_no_option_that_has_no_effect():
    from megatron_dgrpo.config import load_config

    example = Path(__file__).resolve().parents[2] / "examples" / "cpu_tiny_dgrpo.yaml"
    assert load_config(RunConfig, example).notices() == []
