"""``dgrpo train --config FILE [key=value ...]``: validate the run config, then train.

    dgrpo train --config examples/cpu_quickstart.yaml steps=5 loss.kl_coef=0.1
    torchrun --nproc-per-node 2 -m megatron_dgrpo.cli train --config run.yaml parallel.tensor_parallel=2

Every check (unknown keys, heads % TP, teacher/student vocabulary, CP or clipping on CPU)
runs before any model is built. Exit code 3 means "saved on a pre-emption signal".
"""

from __future__ import annotations

import argparse


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. loss.kl_coef=0.05 steps=100")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_train(args: argparse.Namespace) -> int:
    from megatron_dgrpo.config import load_config
    from megatron_dgrpo.parallel.launch import ensure_process_group_env
    from megatron_dgrpo.train.config import RunConfig
    from megatron_dgrpo.train.runner import run_training

    config = load_config(RunConfig, args.config, args.overrides)
    ensure_process_group_env()
    return run_training(config, show_progress=not args.no_progress)
