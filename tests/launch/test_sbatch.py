"""slurm/cpu_quickstart.sbatch against a real single-node Slurm: a run completes with its
checkpoint and metrics; a pre-emption signal makes it save, requeue itself and resume."""

import json
import re
import sys
import time
from pathlib import Path

import pytest

from megatron_dgrpo.launch.local_slurm import FINISHED_STATES
from megatron_dgrpo.train.metrics import read_metrics
from megatron_dgrpo.train.runner import REQUEUE_EXIT_CODE

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(400)]
SCRIPT = "slurm/cpu_quickstart.sbatch"


def _submit(slurm, tmp_path, run_dir, assets, *overrides, **env):
    job = slurm.sbatch([f"--output={tmp_path}/job-%j.out", SCRIPT, *overrides], cwd=REPO,
                       env={"RUN_DIR": str(run_dir), "ASSETS_DIR": str(assets),
                            "DGRPO_PYTHON": sys.executable, **env})
    return job, tmp_path / f"job-{job}.out"


def _steps(run_dir):
    return [record["step"] for record in read_metrics(run_dir)]


def _checkpoints(run_dir):
    return sorted(p.name for p in (Path(run_dir) / "checkpoints").glob("step_*"))


def test_shell_requeue_code_is_the_trainers():
    text = (REPO / "slurm/lib/common.sh").read_text()
    assert re.search(r"^DGRPO_REQUEUE_EXIT_CODE=(\d+)$", text, re.MULTILINE).group(1) == str(REQUEUE_EXIT_CODE)


def test_cpu_quickstart_job_completes_with_checkpoint_and_metrics(local_slurm, tmp_path):
    run_dir, assets = tmp_path / "run", tmp_path / "assets"  # assets: made by the job itself
    job, log = _submit(local_slurm, tmp_path, run_dir, assets, "steps=3", "save_every=2")
    info = local_slurm.wait(job, timeout=300)
    assert info["JobState"] == "COMPLETED", log.read_text()[-3000:]
    assert info["ExitCode"] == "0:0"
    assert (assets / "tokenizer" / "tokenizer.json").is_file() and (assets / "data").is_dir()
    assert _steps(run_dir) == [1, 2, 3]
    assert _checkpoints(run_dir) == ["step_00000002", "step_00000003"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    state = json.loads((run_dir / "checkpoints/step_00000003/trainer_state.json").read_text())
    assert state["step"] == 3 and state["layout"]["world_size"] == 2  # TP=2 from --ntasks=2
    model = run_dir / "checkpoints/step_00000003/model"
    assert sorted(p.name for p in model.glob("mp_rank_*")) == ["mp_rank_00_000", "mp_rank_01_000"]
    assert (run_dir / "slurm" / f"{job}-r0" / "env.txt").read_text().count(f"SLURM_JOB_ID={job}") == 1


def test_preemption_signal_saves_then_requeued_job_resumes(local_slurm, tmp_path, cpu_assets):
    run_dir = tmp_path / "run"
    # save_every above steps: the only checkpoints are the one the signal asks for and the last.
    job, log = _submit(local_slurm, tmp_path, run_dir, cpu_assets,
                       "steps=8", "save_every=100", "keep_last=10")
    deadline = time.monotonic() + 240
    while len(_steps(run_dir)) < 2:  # past start-up: the trainer's signal handler is in place
        state = local_slurm.job(job)["JobState"]
        assert state in ("PENDING", "RUNNING"), f"job {state} early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "the job logged no 2 steps in 240 s"
        time.sleep(0.2)
    signalled_at = time.time()
    local_slurm.run(["scancel", "--signal=USR1", "--batch", str(job)])  # to the batch shell

    deadline = time.monotonic() + 120
    # Until requeued and pending again (it passes through REQUEUED / COMPLETING on the way).
    while (info := local_slurm.job(job))["JobState"] != "PENDING" or info["Restarts"] == "0":
        assert info["JobState"] not in FINISHED_STATES, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"not requeued in 120 s: {info}"
        time.sleep(0.5)
    assert info["Restarts"] == "1", info
    saved = _checkpoints(run_dir)
    assert len(saved) == 1, saved  # written on the signal, before the step count reached 8
    saved_step = int(saved[0].split("_")[1])
    assert 2 <= saved_step < 8
    assert _steps(run_dir) == list(range(1, saved_step + 1))
    assert "requeueing job" in log.read_text()
    # Slurm holds a requeued job for a while (BeginTime); let it start now, but not within
    # the second its old credential was revoked: slurmd refuses credentials created in that
    # second ("Job credential revoked") and the job would end FAILED.
    time.sleep(2)
    local_slurm.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False)

    info = local_slurm.wait(job, timeout=300)
    assert info["JobState"] == "COMPLETED", log.read_text()[-3000:]
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 9))  # continued, no step twice
    before = [r["time"] for r in records if r["step"] <= saved_step]
    after = [r["time"] for r in records if r["step"] > saved_step]
    assert max(before) < signalled_at + 60 and min(after) > max(before)
    assert _checkpoints(run_dir) == [saved[0], "step_00000008"]
    assert sorted(p.name for p in (run_dir / "slurm").iterdir()) == [f"{job}-r0", f"{job}-r1"]


def test_missing_config_fails_the_job_with_a_clear_error(local_slurm, tmp_path, cpu_assets):
    job, log = _submit(local_slurm, tmp_path, tmp_path / "run", cpu_assets,
                       CONFIG="examples/no_such_config.yaml")
    info = local_slurm.wait(job, timeout=120)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0"
    assert "config examples/no_such_config.yaml not found" in log.read_text()
