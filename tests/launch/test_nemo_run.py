"""examples/nemo_run/dgrpo_recipe.py in its own NeMo-Run environment: the local executor trains
the tiny job, the Slurm executor's dry run asks for the recipe's resources, and a real
submission to the test Slurm completes."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_dgrpo.train.metrics import read_metrics

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(400)]
REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "examples" / "nemo_run" / "dgrpo_recipe.py"


def _recipe(launch_python, tmp_path, *args, env=None, timeout=300):
    return subprocess.run([launch_python, str(RECIPE), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout,
                          env={**(env or os.environ),
                               "NEMORUN_HOME": str(tmp_path / "nemorun-home")})


def _tiny(assets, run_dir, steps):
    return ["--python", sys.executable, "--config", "examples/cpu_tiny_dgrpo.yaml",
            "--run-dir", str(run_dir),
            f"tokenizer={assets / 'tokenizer'}", f"data.paths=[{assets / 'data'}]",
            f"steps={steps}", f"save_every={steps}"]


def _sbatch_options(script):
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.MULTILINE))


def test_slurm_dry_run_asks_for_the_recipes_resources(launch_python, tmp_path):
    result = _recipe(launch_python, tmp_path, "slurm", "--dry-run", "--nodes", "3",
                     "--gpus-per-node", "4", "--partition", "part-x", "--account", "acct-y",
                     "--time", "01:30:00", "--container-image", "registry/img:tag",
                     "--config", "examples/cpu_tiny_dgrpo.yaml", "--run-dir", "/ckpt/run-z",
                     "steps=7")
    assert result.returncode == 0, result.stderr[-3000:]
    script = result.stdout[result.stdout.index("#!/bin/bash"):]
    options = _sbatch_options(script)
    assert options["nodes"] == "3"
    assert options["ntasks-per-node"] == "4" and options["gpus-per-node"] == "4"  # task per GPU
    assert options["time"] == "01:30:00"
    assert options["partition"] == "part-x" and options["account"] == "acct-y"
    assert options["signal"] == "USR1@120" and "requeue" in options
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--container-image registry/img:tag" in srun
    assert f"{REPO}/slurm/lib/srun_task.sh python -m megatron_dgrpo.cli train" in srun
    assert srun.endswith("run_dir=/ckpt/run-z steps=7")
    assert "export MASTER_ADDR=$head_node_ip" in script


def test_slurm_dry_run_for_cpu_nodes_and_bad_input(launch_python, tmp_path):
    cpu = _recipe(launch_python, tmp_path, "slurm", "--dry-run", "--gpus-per-node", "0",
                  "--ntasks-per-node", "2", "--account", "a", "--config",
                  "examples/cpu_tiny_dgrpo.yaml", "--run-dir", "r")
    assert cpu.returncode == 0, cpu.stderr[-3000:]
    options = _sbatch_options(cpu.stdout)
    assert options["ntasks-per-node"] == "2" and "gpus-per-node" not in options
    no_tasks = _recipe(launch_python, tmp_path, "slurm", "--dry-run", "--gpus-per-node", "0",
                       "--config", "examples/cpu_tiny_dgrpo.yaml", "--run-dir", "r")
    assert no_tasks.returncode != 0 and "give --ntasks-per-node" in no_tasks.stderr
    missing = _recipe(launch_python, tmp_path, "local", "--config", "nope.yaml", "--run-dir", "r")
    assert missing.returncode != 0 and "config nope.yaml not found" in missing.stderr


def test_local_executor_runs_the_tiny_job(launch_python, tmp_path, cpu_assets):
    run_dir = tmp_path / "run"
    result = _recipe(launch_python, tmp_path, "local", "--ranks", "2",
                     *_tiny(cpu_assets, run_dir, steps=2))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "local run finished: SUCCEEDED" in result.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"


def test_local_executor_reports_a_failed_run(launch_python, tmp_path, cpu_assets):
    result = _recipe(launch_python, tmp_path, "local", *_tiny(cpu_assets, tmp_path / "run", 2),
                     "parallel.tensor_parallel=3")  # 4 heads are not divisible by 3
    assert result.returncode == 1
    assert "local run finished: FAILED" in result.stdout


def test_slurm_executor_submission_completes(launch_python, tmp_path, cpu_assets, local_slurm):
    run_dir = tmp_path / "run"
    result = _recipe(launch_python, tmp_path, "slurm", "--gpus-per-node", "0",
                     "--ntasks-per-node", "2", "--cpus-per-task", "1", "--partition",
                     local_slurm.partition, "--account", "test", "--time", "00:10:00",
                     *_tiny(cpu_assets, run_dir, steps=2), "parallel.tensor_parallel=2",
                     env=local_slurm.env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    job = int(re.search(r"submitted Slurm job (\d+)", result.stdout).group(1))
    info = local_slurm.wait(job, timeout=300)
    log = Path(info["StdOut"])
    assert info["JobState"] == "COMPLETED", log.read_text()[-3000:] if log.is_file() else info
    assert info["NumTasks"] == "2"
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    assert (run_dir / "checkpoints" / "step_00000002" / "trainer_state.json").is_file()
