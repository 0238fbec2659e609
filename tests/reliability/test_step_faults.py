"""Faults inside a step and at save time, in real ``dgrpo train`` processes: a non-finite loss
(skipped, then the run stops), reward functions that raise or return NaN (the sample, not
the run), a rollout engine that fails or returns fewer samples (retried, then a named
error), and a save that the disk refuses (a named error, the earlier checkpoints intact).

Faults are injected with ``DGRPO_FAULT_INJECT`` (:mod:`megatron_dgrpo.train.faults`), a
reward function registered in the run's process, and the operating system: a file-size limit
(``RLIMIT_FSIZE``: writes fail with ``EFBIG``, as on a full disk), a real full tmpfs
(``ENOSPC``; where this machine lets the test mount one) and an immutable checkpoints
directory (``chattr +i``; where the file system supports it).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from reliability_helpers import bytes_lost, log_text, run_to_end, tree_digest
from safetensors import safe_open

from megatron_dgrpo.train.guards import invalid_rewards
from megatron_dgrpo.train.metrics import read_metrics

pytestmark = [pytest.mark.reliability, pytest.mark.multiproc]

NON_DETERMINISTIC = ("time", "time/", "throughput/", "memory/")


def _train(launcher, assets, tmp_path, name, steps=3, env=None, setup=None, file_size_limit=None,
           run_dir=None, **changes) -> tuple[int, str, Path]:
    run_dir = run_dir or tmp_path / name
    config = assets.write_config(tmp_path / f"{name}.yaml", run_dir, steps=steps, **changes)
    log = tmp_path / f"{name}-{len(list(tmp_path.glob(f'{name}-*.log')))}.log"
    process = launcher.start(["train", "--config", str(config), "--no-progress"], log, env,
                             file_size_limit=file_size_limit, setup=setup)
    return run_to_end(process), log_text(log), run_dir


def _steps_saved(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*"))


def _adam_steps(run_dir: Path, step: int) -> float:
    """Adam's update count in checkpoint ``step`` (the first parameter's)."""
    path = run_dir / "checkpoints" / f"step_{step:08d}" / "optimizer" / "rank_00000.safetensors"
    with safe_open(str(path), "pt") as handle:
        scalars = json.loads(handle.metadata()["scalars"])
        names = [n for n in handle.keys() if n.endswith(".step")]
        if names:
            return float(handle.get_tensor(names[0]))
    return float(next(iter(scalars.values()))["step"])


def _comparable(run_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(NON_DETERMINISTIC)}
            for r in read_metrics(run_dir)]


# ------------------------------------------------------------------ non-finite loss


@pytest.mark.reliability_case("fault")
def test_a_nan_loss_step_is_skipped_and_the_run_goes_on(launcher, synth_assets, tmp_path):
    code, log, run_dir = _train(launcher, synth_assets, tmp_path, "nan-once", steps=3,
                                env={"DGRPO_FAULT_INJECT": "loss.nan@2"})
    assert code == 0, log[-3000:]
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["loss"] is None and records[1]["optim/skipped"] == 1.0
    assert records[1]["optim/grad_norm"] is None  # NaN, logged as null
    assert records[0]["optim/skipped"] == records[2]["optim/skipped"] == 0.0
    assert math.isfinite(records[2]["loss"])
    assert "step 2 skipped: non-finite loss=nan" in log
    # nothing written for step 2, and Adam took 2 updates in 3 steps
    assert _steps_saved(run_dir) == [1, 3]
    assert _adam_steps(run_dir, 1) == 1 and _adam_steps(run_dir, 3) == 2


@pytest.mark.reliability_case("fault")
def test_consecutive_nan_steps_stop_the_run_with_a_message(launcher, synth_assets, tmp_path):
    code, log, run_dir = _train(launcher, synth_assets, tmp_path, "nan-thrice", steps=6,
                                env={"DGRPO_FAULT_INJECT": "loss.nan@2,loss.nan@3,loss.nan@4"},
                                max_skipped_steps=3)
    assert code == 1, log[-3000:]
    assert "dgrpo train: DivergedError: step 4: 3 steps in a row had a non-finite loss" in log
    assert "Traceback" not in log
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    assert _steps_saved(run_dir) == [1]


# ------------------------------------------------------------------ rewards


REWARD_LOG = "RELIABILITY_REWARD_LOG"


def _flaky_reward(answer: str, reference: str) -> float:
    """Raises for answers of length 0 mod 3, NaN for 1 mod 3, else the parity of the length;
    each call's outcome goes to the file ``$RELIABILITY_REWARD_LOG``."""
    outcome = ("raise", "nan", "ok")[len(answer) % 3]
    with open(os.environ[REWARD_LOG], "a") as out:
        out.write(outcome + "\n")
    if outcome == "raise":
        raise ZeroDivisionError("a reward function bug")
    return math.nan if outcome == "nan" else float(len(answer) % 2)


def register_flaky_reward() -> None:
    from megatron_dgrpo.data.rewards import register_reward

    register_reward("test_flaky")(_flaky_reward)


def test_failed_rewards_are_replaced_by_their_group_mean_and_masked():
    rewards = torch.tensor([1.0, math.nan, 0.0, 0.0,      # group 0: mean of valid = 1/3
                            math.inf, math.nan, -math.inf, math.nan,   # group 1: none valid
                            0.5, 0.5, 1.0, 0.0])          # group 2: all valid
    fixed, invalid = invalid_rewards(rewards, 4)
    torch.testing.assert_close(fixed, torch.tensor([1.0, 1 / 3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                                                    0.5, 0.5, 1.0, 0.0]))
    assert invalid.tolist() == [False, True, False, False] + [True] * 4 + [False] * 4
    # the group mean of the valid rewards is unchanged (advantages without std scaling)
    assert fixed[:4].mean() == pytest.approx(1 / 3)


@pytest.mark.reliability_case("fault")
def test_a_reward_that_raises_or_returns_nan_marks_the_sample_not_the_run(
        launcher, synth_assets, tmp_path):
    calls = tmp_path / "reward-calls.txt"
    code, log, run_dir = _train(
        launcher, synth_assets, tmp_path, "flaky-reward", steps=3,
        env={REWARD_LOG: str(calls)}, setup=register_flaky_reward,
        rewards={"per_task": {}, "default": "test_flaky"}, sampling={"n": 4})
    assert code == 0, log[-3000:]
    outcomes = calls.read_text().split()
    per_step = [outcomes[i:i + 8] for i in range(0, len(outcomes), 8)]  # 2 prompts x 4
    assert len(per_step) == 3 and all(len(s) == 8 for s in per_step)
    assert any(o != "ok" for o in outcomes)  # the case happens
    records = read_metrics(run_dir)
    for record, step_outcomes in zip(records, per_step):
        assert record["reward/invalid"] == sum(o != "ok" for o in step_outcomes)
        assert math.isfinite(record["loss"]) and record["optim/skipped"] == 0.0
        assert 0.0 <= record["reward/mean"] <= 1.0
    assert {"raise", "nan"} <= set(outcomes)  # both kinds of failure happen
    assert re.search(r"\d of 8 rewards failed and get zero weight \(first: test_flaky (raised "
                     r"ZeroDivisionError: a reward function bug|returned nan)\)", log)


# ------------------------------------------------------------------ rollouts


@pytest.mark.reliability_case("fault")
def test_a_failed_and_a_short_rollout_are_retried_and_change_nothing(
        launcher, synth_assets, tmp_path):
    code, log, run_dir = _train(launcher, synth_assets, tmp_path, "retried", steps=3,
                                env={"DGRPO_FAULT_INJECT": "rollout.error@2x1,rollout.short@3x1"})
    assert code == 0, log[-3000:]
    assert "step 2: rollout attempt 1 of 2 failed (EmbeddedEngine.generate failed: " \
           "RuntimeError: injected by DGRPO_FAULT_INJECT); retrying" in log
    assert "step 3: rollout attempt 1 of 2 failed (the engine returned 3 samples for 2 " \
           "prompts x 2 (prompt 1: 1 of 2)); retrying" in log
    code, reference_log, reference = _train(launcher, synth_assets, tmp_path, "unfaulted",
                                            steps=3)
    assert code == 0, reference_log[-3000:]
    assert _comparable(run_dir) == _comparable(reference)


@pytest.mark.reliability_case("fault")
@pytest.mark.parametrize("fault, message", [
    ("rollout.error@2", "EmbeddedEngine.generate failed: RuntimeError: injected by "
                        "DGRPO_FAULT_INJECT | EmbeddedEngine.generate failed"),
    ("rollout.short@2", "the engine returned 3 samples for 2 prompts x 2 (prompt 1: 1 of 2) | "
                        "the engine returned 3 samples"),
])
def test_a_rollout_engine_that_keeps_failing_stops_the_run_naming_the_error(
        launcher, synth_assets, tmp_path, fault, message):
    code, log, run_dir = _train(launcher, synth_assets, tmp_path, "broken-engine", steps=3,
                                env={"DGRPO_FAULT_INJECT": fault})
    assert code == 1, log[-3000:]
    assert "dgrpo train: RolloutError: step 2: rollouts failed 2 times (rollout.retries=1): " \
        + message in log
    assert "Traceback" not in log
    assert _steps_saved(run_dir) == [1]


# ------------------------------------------------------------------ disk full, unwritable


@pytest.fixture(scope="module")
def two_step_run(launcher, synth_assets, tmp_path_factory) -> Path:
    """A run stopped after 2 steps (checkpoints 1 and 2), to be copied and continued."""
    root = tmp_path_factory.mktemp("two-step-run")
    code, log, run_dir = _train(launcher, synth_assets, root, "run", steps=2, keep_last=5)
    assert code == 0, log[-3000:]
    return run_dir


def _mount_tmpfs(where: Path, size: int) -> bool:
    where.mkdir()
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _chattr(path: Path, flag: str) -> bool:
    try:
        return subprocess.run(["chattr", flag, str(path)], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@pytest.mark.reliability_case("fault")
@pytest.mark.parametrize("refusal", ["file-size-limit", "full-tmpfs", "immutable-directory"])
def test_a_save_the_disk_refuses_is_a_named_error_and_keeps_the_last_checkpoint(
        launcher, synth_assets, two_step_run, tmp_path, ledger, refusal):
    run_dir, limit = tmp_path / "run", None
    if refusal == "full-tmpfs":
        # room for the copied run and less than one more checkpoint
        if not _mount_tmpfs(tmp_path / "tmpfs", _tree_bytes(two_step_run) + 512 * 1024):
            pytest.skip("cannot mount a tmpfs here")
        run_dir = tmp_path / "tmpfs" / "run"
    shutil.copytree(two_step_run, run_dir)
    checkpoints = run_dir / "checkpoints"
    before = tree_digest(checkpoints)
    if refusal == "file-size-limit":
        limit = 256 * 1024  # the metrics lines fit, no model shard does
    if refusal == "immutable-directory" and not _chattr(checkpoints, "+i"):
        pytest.skip("chattr +i is not available here")
    try:
        code, log, _ = _train(launcher, synth_assets, tmp_path, "refused", steps=4, keep_last=5,
                              run_dir=run_dir, file_size_limit=limit)
    finally:
        if refusal == "immutable-directory":
            _chattr(checkpoints, "-i")
        after = tree_digest(checkpoints)
        if refusal == "full-tmpfs":
            shutil.copytree(run_dir, tmp_path / "copied-back")
            subprocess.run(["umount", str(tmp_path / "tmpfs")], check=True, timeout=60)
            run_dir = tmp_path / "copied-back"
        lost = bytes_lost(before, after)
        ledger.bytes_lost += lost
    assert code == 1, log[-3000:]
    errno = {"file-size-limit": "File too large", "full-tmpfs": "No space left on device",
             "immutable-directory": "Operation not permitted"}[refusal]
    assert (f"dgrpo train: CheckpointWriteError: could not write checkpoint {checkpoints}"
            f"/step_00000003: ") in log and errno in log, log[-3000:]
    assert (f"Nothing of it was kept and the previous checkpoint {checkpoints}/step_00000002 "
            "is intact") in log
    assert "Traceback" not in log
    assert lost == 0 and after == before  # not a byte of the earlier checkpoints changed
    # the run resumes from step 2 once the disk takes writes again
    code, log, _ = _train(launcher, synth_assets, tmp_path, "recovered", steps=4, keep_last=5,
                          run_dir=run_dir)
    assert code == 0, log[-3000:]
    assert "from " in log and "step_00000002 (step 2)" in log
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
