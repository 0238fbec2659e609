"""`dgrpo train` on real TP=2 ranks: every objective trains, resume is exact, bad configs are
refused before any work.

Exactness reference: an uninterrupted run. A run stopped after step 1 and restarted must log
the same metrics (timings aside) and end with bit-identical weights.
"""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from megatron_dgrpo.config import from_dict
from megatron_dgrpo.models.presets import get_preset
from megatron_dgrpo.testing.distributed import run_distributed
from megatron_dgrpo.train.config import TEACHER_OBJECTIVES, RunConfig
from megatron_dgrpo.train.metrics import read_metrics

OBJECTIVES = ("sft", "kd", "grpo", "opd", "dgrpo")
NON_DETERMINISTIC = ("time/", "throughput/", "memory/")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, hf_tokenizer_dir):
    from megatron_dgrpo.cli import main
    from megatron_dgrpo.data.chat import load_chat_tokenizer

    root = tmp_path_factory.mktemp("train")
    assert main(["data", "synth", "--out", str(root / "data"), "--num", "8", "--lengths", "256",
                 "--seed", "3"]) == 0
    return root, hf_tokenizer_dir, load_chat_tokenizer(hf_tokenizer_dir).vocab_size


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
    if objective in TEACHER_OBJECTIVES:
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
    if objective in ("grpo", "opd", "dgrpo"):
        assert 0.0 <= records[0]["reward/mean"] <= 1.0
        assert records[0]["response/length_mean"] > 0
    if objective == "kd":
        assert records[0]["policy/kl_teacher_forward"] > 0
    if objective in ("opd", "dgrpo"):
        assert records[0]["policy/kl_teacher"] > 0


@pytest.mark.multiproc
@pytest.mark.parametrize("objective", ["sft", "dgrpo"])
def test_interrupted_run_resumes_exactly(setup, objective):
    straight = _config(setup, objective, f"straight-{objective}", steps=3)
    assert run_distributed(_train, 2, args=(straight,)) == [0, 0]
    interrupted = _config(setup, objective, f"interrupted-{objective}", steps=1)
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
    ({"parallel": {"tensor_parallel": 2, "context_parallel": 2}}, "ontext parallel"),
    ({"loss": {"objective": "grpo"}, "sampling": {"n": 1}}, "sampling.n >= 2"),
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
