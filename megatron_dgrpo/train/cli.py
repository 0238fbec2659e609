"""``dgrpo train --config FILE [key=value ...]``: validate the run config, then train.

    dgrpo train --config examples/cpu_quickstart.yaml steps=5 loss.kl_coef=0.1
    torchrun --nproc-per-node 2 -m megatron_dgrpo.cli train --config run.yaml parallel.tensor_parallel=2

Every check (unknown keys, heads % TP, teacher/student vocabulary, CP or clipping on CPU,
the per-GPU memory arithmetic on CUDA) runs before any model is built. ``--dry-run`` stops
there and prints the start-up notices and the memory budget (:mod:`megatron_dgrpo.train.
memory`). Exit code 3 means "saved on a pre-emption signal".
"""

from __future__ import annotations

import argparse


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. loss.kl_coef=0.05 steps=100")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config, print its notices and per-GPU memory budget, "
                             "and exit without building anything")


def run_train(args: argparse.Namespace) -> int:
    from megatron_dgrpo.config import load_config
    from megatron_dgrpo.parallel.launch import ensure_process_group_env
    from megatron_dgrpo.train.config import RunConfig
    from megatron_dgrpo.train.runner import run_training

    config = load_config(RunConfig, args.config, args.overrides)
    if args.dry_run:
        print(dry_run_report(config))
        return 0
    ensure_process_group_env()
    return run_training(config, show_progress=not args.no_progress)


def dry_run_report(config) -> str:
    """What ``--dry-run`` prints: the config is valid, its notices, its memory budget."""
    plan = config.memory_plan()
    lines = ["config is valid"] + [f"notice: {note}" for note in config.notices()]
    lines.append(plan.summary() if plan is not None else
                 "memory budget: not computed (no CUDA here; set parallel.gpu_memory_gib "
                 "to see the per-GPU budget of a GPU run)")
    return "\n".join(lines)
