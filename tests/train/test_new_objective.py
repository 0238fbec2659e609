"""CONTRIBUTING's worked example (a new objective is a registry entry) runs through the
trainer unchanged: the snippet is read from CONTRIBUTING.md, registered, and trained on."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from megatron_dgrpo.models.presets import get_preset
from megatron_dgrpo.parallel.launch import run_distributed

CONTRIBUTING = Path(__file__).resolve().parents[2] / "CONTRIBUTING.md"


def example_snippet() -> str:
    section = CONTRIBUTING.read_text().split("## Adding an objective", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


def register_example() -> None:
    from megatron_dgrpo.algorithms import objectives

    exec(example_snippet(), vars(objectives))  # noqa: S102 - our own documentation


def _train(rank, world_size, config_dict):
    from megatron_dgrpo.config import from_dict
    from megatron_dgrpo.train.config import RunConfig
    from megatron_dgrpo.train.runner import run_training

    register_example()
    return run_training(from_dict(RunConfig, config_dict), show_progress=False)


@pytest.mark.multiproc
def test_the_worked_example_objective_trains_through_the_unchanged_trainer(make_synth_setup):
    from megatron_dgrpo.train.metrics import read_metrics

    root, tokenizer_dir, vocab = make_synth_setup("new-objective", num=4, seed=11)
    student = dataclasses.asdict(dataclasses.replace(get_preset("tiny-qwen3"), vocab_size=vocab))
    teacher = dataclasses.asdict(dataclasses.replace(get_preset("small-qwen3"), vocab_size=vocab))
    config = {"run_dir": str(root / "run"), "steps": 1, "prompts_per_step": 2,
              "tokenizer": str(tokenizer_dir), "student": {"preset": None, "model": student},
              "teacher": {"preset": None, "model": teacher},
              "loss": {"objective": "onpolicy_kd"},
              "sampling": {"n": 2, "max_new_tokens": 4},
              "data": {"paths": [str(root / "data")]}}
    assert run_distributed(_train, 1, args=(config,)) == [0]
    (record,) = read_metrics(config["run_dir"])
    # It sampled rollouts and scored them (on_policy), read the teacher's full distribution
    # (needs_teacher, default estimator "full"), and trained on the forward KL alone:
    assert record["response/length_mean"] > 0 and "reward/mean" in record
    assert record["policy/kl_teacher_forward"] > 0
    assert record["loss"] == pytest.approx(record["policy/kl_teacher_forward"], rel=1e-6)
    assert "policy/ratio_mean" not in record  # no policy-gradient term


def test_the_worked_example_objective_is_validated_by_its_traits():
    from megatron_dgrpo.algorithms.objectives import OBJECTIVES, LossConfig

    register_example()
    try:
        with pytest.raises(ValueError, match="unknown kl_estimator 'k3'"):
            LossConfig(objective="onpolicy_kd", kl_estimator="k3").validate()
        with pytest.raises(ValueError, match="form='advantage' applies to dgrpo, opd"):
            LossConfig(objective="onpolicy_kd", form="advantage").validate()
        assert not LossConfig(objective="onpolicy_kd", kl_coef=0.5).needs_reference
    finally:
        OBJECTIVES.pop("onpolicy_kd")
