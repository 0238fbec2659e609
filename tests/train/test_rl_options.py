"""Dynamic sampling and overlong handling in real `dgrpo train` runs (TP=1, embedded engine):
the same seeds give the same rollouts, so each option is compared with the run without it."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_dgrpo.models.presets import get_preset
from megatron_dgrpo.parallel.launch import run_distributed
from megatron_dgrpo.train.metrics import read_metrics

pytestmark = pytest.mark.multiproc


def _register_rewards():
    from megatron_dgrpo.data.rewards import REWARDS, register_reward

    if "half_flat" not in REWARDS:
        # Prompts with an even-length reference get 1.0 whatever the answer (a group with no
        # signal); the others a reward that varies with the sampled answer.
        register_reward("half_flat")(
            lambda answer, reference: 1.0 if len(reference) % 2 == 0
            else float(sum(map(ord, answer)) % 2))


def _runs(rank, world_size, configs):
    from megatron_dgrpo.config import from_dict
    from megatron_dgrpo.models.provider import destroy_parallel
    from megatron_dgrpo.train.config import RunConfig
    from megatron_dgrpo.train.runner import run_training

    _register_rewards()
    codes = []
    for config in configs:
        codes.append(run_training(from_dict(RunConfig, config), show_progress=False))
        destroy_parallel()
    return codes


@pytest.fixture(scope="module")
def setup(make_synth_setup):
    return make_synth_setup("rl-options", num=16, seed=23)


def _config(setup, name, **top):
    root, tokenizer_dir, vocab = setup
    student = dataclasses.asdict(dataclasses.replace(get_preset("tiny-qwen3"), vocab_size=vocab))
    teacher = dataclasses.asdict(dataclasses.replace(get_preset("small-qwen3"), vocab_size=vocab))
    config = {"run_dir": str(root / name), "steps": 2, "save_every": 10, "prompts_per_step": 2,
              "tokenizer": str(tokenizer_dir), "student": {"preset": None, "model": student},
              "teacher": {"preset": None, "model": teacher}, "loss": {"objective": "dgrpo"},
              "sampling": {"n": 2, "max_new_tokens": 4},
              "rewards": {"per_task": {}, "default": "half_flat"},
              "data": {"paths": [str(root / "data")]}}
    for key, value in top.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


@pytest.fixture(scope="module")
def runs(setup):
    configs = {
        "keep": _config(setup, "keep"),
        "drop": _config(setup, "drop", dynamic_sampling={"mode": "drop", "max_rounds": 4}),
        "mask": _config(setup, "mask", rewards={"overlong": "mask"}),
        "penalty": _config(setup, "penalty", rewards={"overlong": "penalty",
                                                       "overlong_buffer": 2,
                                                       "overlong_weight": 0.5}),
    }
    assert run_distributed(_runs, 1, args=(list(configs.values()),)) == [[0] * len(configs)]
    return {name: read_metrics(config["run_dir"]) for name, config in configs.items()}


def test_groups_without_signal_are_reported_and_dropped_on_request(runs):
    kept, dropped = runs["keep"], runs["drop"]
    assert any(r["groups/zero_advantage_frac"] > 0 for r in kept)  # the reward makes some
    assert all("groups/rounds" not in r for r in kept)
    for record in dropped:
        assert 1 <= record["groups/rounds"] <= 4
        if record["groups/short"] == 0:  # every group trained on carries signal
            assert record["groups/zero_advantage_frac"] == 0
    assert sum(r["groups/rounds"] for r in dropped) > len(dropped)  # extra prompts were drawn


def test_truncated_responses_can_be_masked_or_penalised(runs):
    plain, masked, penalised = runs["keep"], runs["mask"], runs["penalty"]
    # a random 2-layer model never stops within 4 tokens: every response is truncated
    assert all(r["response/truncated_frac"] == 1.0 for r in plain)
    for record in masked:  # no loss token left: nothing trains
        assert record["loss"] == 0.0 and record["optim/grad_norm"] == 0.0
    first_plain, first_penalised = plain[0], penalised[0]  # same seed, same first rollouts
    # 4 tokens at a budget of 4 with a buffer of 2: penalty -1, times weight 0.5
    assert first_penalised["reward/mean"] == pytest.approx(first_plain["reward/mean"] - 0.5)


def test_token_share_mixing_resumes_exactly(setup, tmp_path_factory):
    """`short_data` mixed into `data` at long_share 0.5 (data/mix.py TokenShareMixer): the
    realised share of prompt tokens approaches 0.5, and a run interrupted after one step
    resumes the mixer where it stood (same examples, same metrics)."""
    from megatron_dgrpo.cli import main

    short = tmp_path_factory.mktemp("short") / "data"
    assert main(["data", "synth", "--out", str(short), "--num", "16", "--lengths", "64",
                 "--seed", "29", "--tokenizer", str(setup[1])]) == 0
    mixed = {"short_data": {"paths": [str(short)]}, "mix": {"long_share": 0.5},
             "loss": {"objective": "sft"}, "sampling": {}}

    def config(name, steps):
        c = _config(setup, name, steps=steps, **mixed)
        del c["teacher"], c["sampling"]
        c["rewards"] = {}
        return c

    straight, interrupted = config("mix-straight", 3), config("mix-interrupted", 1)
    resumed = {**interrupted, "steps": 3}
    assert run_distributed(_runs, 1, args=([straight, interrupted, resumed],)) == [[0, 0, 0]]
    shares = [r["data/long_token_share"] for r in read_metrics(straight["run_dir"])]
    assert 0.3 < shares[-1] < 0.7 and len(set(shares)) > 1

    def comparable(run_dir):
        return [{k: v for k, v in r.items() if k != "time" and not k.startswith(
            ("time/", "throughput/", "memory/"))} for r in read_metrics(run_dir)]

    assert comparable(interrupted["run_dir"]) == comparable(straight["run_dir"])
