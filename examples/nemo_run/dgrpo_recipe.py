#!/usr/bin/env python3
"""NeMo-Run recipes for ``dgrpo train``: a Slurm executor for clusters, a local one for a box.

NeMo-Run lives in its own environment (its leptonai pin conflicts with vLLM's dependencies);
create it with ``tools/install_launch.sh`` (-> ``.venv-launch``). The training itself runs
with ``--python``, the interpreter that has megatron-dgrpo (default ``.venv/bin/python``, or
``python`` inside the container on a cluster). Paths are made absolute against the checkout.

    # cluster: N nodes x G GPUs, one task per GPU, pyxis container; --dry-run prints the sbatch
    .venv-launch/bin/python examples/nemo_run/dgrpo_recipe.py slurm --config CONFIG.yaml \\
        --nodes 2 --gpus-per-node 8 --partition "$PARTITION" --account "$ACCOUNT" \\
        --time 04:00:00 --container-image "$IMAGE" --run-dir /lustre/me/runs/x --dry-run
    # this machine: torchrun with 2 CPU ranks, the CPU tiny config
    .venv-launch/bin/python examples/nemo_run/dgrpo_recipe.py local --ranks 2 \\
        --config examples/cpu_tiny_dgrpo.yaml --run-dir runs/nemo-tiny

Extra ``key=value`` arguments after the options are config overrides. Pre-emption on Slurm:
``--signal USR1@120`` reaches every rank (the trainer saves after its step and exits 3) and
NeMo-Run's retry logic (``--retries``) requeues the job, which resumes from RUN_DIR.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

HOME = Path(__file__).resolve().parents[2]  # the megatron-dgrpo checkout


def _absolute(path: str) -> str:
    return str(path if os.path.isabs(path) else (HOME / path).resolve())


def train_args(config: str, run_dir: str, overrides: list[str], python: str) -> list[str]:
    """``PYTHON -m megatron_dgrpo.cli train --config CONFIG run_dir=RUN_DIR OVERRIDES``."""
    return [python, "-m", "megatron_dgrpo.cli", "train", "--no-progress",
            "--config", _absolute(config), f"run_dir={_absolute(run_dir)}", *overrides]


def slurm_recipe(args: argparse.Namespace):
    """(script, executor) for a Slurm cluster: one task per GPU through slurm/lib/srun_task.sh."""
    import nemo_run as run

    gpus = args.gpus_per_node
    executor = run.SlurmExecutor(
        account=args.account, partition=args.partition, time=args.time, nodes=args.nodes,
        ntasks_per_node=args.ntasks_per_node or gpus or 1,
        gpus_per_node=gpus or None, cpus_per_task=args.cpus_per_task,
        signal=args.signal, exclusive=True if gpus else None,
        additional_parameters={"requeue": True},
        container_image=args.container_image or None,
        container_mounts=[f"{HOME}:{HOME}", *args.container_mount] if args.container_image else [],
        # Submit from this machine (a login node): NeMo-Run writes the sbatch script and logs
        # under $NEMORUN_HOME/experiments (default ~/.nemo_run), which must be on a shared
        # file system.
        tunnel=run.LocalTunnel(job_dir=""),
        packager=run.Packager(),  # the checkout is on a shared file system: ship nothing
    )
    executor.retries = args.retries
    # MASTER_ADDR: head_node_ip is computed by the preamble of NeMo-Run's sbatch script.
    env = {"MASTER_ADDR": "$head_node_ip", "MASTER_PORT": str(args.master_port),
           "OMP_NUM_THREADS": str(args.cpus_per_task or (8 if gpus else 1))}
    if gpus:
        env.update(CUDA_DEVICE_MAX_CONNECTIONS="1", TORCH_NCCL_ASYNC_ERROR_HANDLING="1",
                   NCCL_DEBUG="WARN")
    python = args.python or ("python" if args.container_image else sys_python_default())
    script = run.Script(path=str(HOME / "slurm" / "lib" / "srun_task.sh"), entrypoint="bash",
                        args=train_args(args.config, args.run_dir, args.overrides, python),
                        env=env)
    return script, executor


def sys_python_default() -> str:
    venv_python = HOME / ".venv" / "bin" / "python"
    return str(venv_python) if venv_python.exists() else "python3"


def local_recipe(args: argparse.Namespace):
    """(script, executor) for this machine: torchrun with ``--ranks`` processes."""
    import nemo_run as run

    python = args.python or sys_python_default()
    command = [python, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.ranks}",
               *train_args(args.config, args.run_dir, args.overrides, python)[1:]]
    script = run.Script(inline=f"cd {shlex.quote(str(HOME))}\nexec {shlex.join(command)}\n",
                        entrypoint="bash")
    executor = run.LocalExecutor(ntasks_per_node=1, env_vars={"OMP_NUM_THREADS": "1"})
    return script, executor


def dry_run_text(experiment) -> str:
    """What a dry run would launch: the sbatch command and script (Slurm), or the command."""
    info = experiment.jobs[0]._dryrun_info  # NeMo-Run keeps the AppDryRunInfo here
    request = info.request
    if hasattr(request, "materialize"):  # Slurm: SlurmBatchRequest
        return f"# {' '.join(request.launch_cmd)} SCRIPT\n{request.materialize()}"
    return str(info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Launch `dgrpo train` with NeMo-Run.")
    where = parser.add_subparsers(dest="executor", required=True, metavar="EXECUTOR")
    for name, text in (("slurm", "submit to a Slurm cluster (sbatch through NeMo-Run)"),
                       ("local", "run on this machine with torchrun")):
        sub = where.add_parser(name, help=text, description=text)
        sub.add_argument("--config", required=True, help="run config YAML")
        sub.add_argument("--run-dir", required=True,
                         help="run directory (resubmitting with the same one resumes)")
        sub.add_argument("--python", help="interpreter with megatron-dgrpo installed")
        sub.add_argument("--name", default="dgrpo", help="experiment / job name")
        sub.add_argument("--dry-run", action="store_true",
                         help="print what would run (the sbatch script for slurm) and exit")
        sub.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    local, slurm = where.choices["local"], where.choices["slurm"]
    local.add_argument("--ranks", type=int, default=1, help="torchrun processes (default 1)")
    slurm.add_argument("--nodes", type=int, default=1)
    slurm.add_argument("--gpus-per-node", type=int, default=8,
                       help="GPUs per node, one task each; 0 for CPU-only nodes (default 8)")
    slurm.add_argument("--ntasks-per-node", type=int,
                       help="tasks per node (default: --gpus-per-node; needed with 0 GPUs)")
    slurm.add_argument("--cpus-per-task", type=int)
    slurm.add_argument("--partition", default=os.environ.get("SBATCH_PARTITION"),
                       help="Slurm partition (default $SBATCH_PARTITION)")
    slurm.add_argument("--account", default=os.environ.get("SBATCH_ACCOUNT", ""),
                       help="Slurm account (default $SBATCH_ACCOUNT)")
    slurm.add_argument("--time", default="04:00:00", help="time limit (default 04:00:00)")
    slurm.add_argument("--signal", default="USR1@120",
                       help="pre-emption signal sent to every rank before the time limit")
    slurm.add_argument("--retries", type=int, default=3,
                       help="requeues after a non-zero exit such as a save-on-signal (default 3)")
    slurm.add_argument("--container-image", help="pyxis image; unset: run on the host")
    slurm.add_argument("--container-mount", action="append", default=[],
                       help="extra SRC:DST container mount (repeatable)")
    slurm.add_argument("--master-port", type=int, default=29500)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bad = [item for item in args.overrides if "=" not in item]
    if bad:
        raise SystemExit(f"error: overrides must be key=value, got {' '.join(bad)}")
    if not Path(_absolute(args.config)).is_file():
        raise SystemExit(f"error: config {args.config} not found")
    if args.executor == "slurm" and args.gpus_per_node == 0 and not args.ntasks_per_node:
        raise SystemExit("error: with --gpus-per-node 0 give --ntasks-per-node")
    # NeMo-Run 0.11 rewrites every "/nemo_run" in host paths of a non-container Slurm job.
    clashes = [p for p in (os.environ.get("NEMORUN_HOME", ""), _absolute(args.run_dir))
               if "/nemo_run/" in p + "/"]
    if args.executor == "slurm" and not args.container_image and clashes:
        raise SystemExit(f"error: {clashes[0]} has a directory named nemo_run, which NeMo-Run "
                         "rewrites in the job's paths; choose another name")
    if args.executor == "local" and args.ranks < 1:
        raise SystemExit("error: --ranks must be >= 1")

    import nemo_run as run

    script, executor = (slurm_recipe if args.executor == "slurm" else local_recipe)(args)
    with run.Experiment(title=args.name, executor=executor) as experiment:
        experiment.add(script, name=args.name, tail_logs=args.executor == "local")
        if args.dry_run:
            experiment.dryrun(log=False)
            print(dry_run_text(experiment))
            return 0
        # detach: submit and return (Slurm); the local run is waited for when the block exits.
        experiment.run(detach=args.executor == "slurm", tail_logs=args.executor == "local")
    job = experiment.jobs[0]
    if args.executor == "local":
        print(f"local run finished: {job.state.name}")
        return 0 if job.state.name == "SUCCEEDED" else 1
    print(f"submitted Slurm job {job.handle.rsplit('/', 1)[-1]} ({job.handle})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
