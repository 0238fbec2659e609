"""``dgrpo train`` runs inside test worker processes (see :mod:`megatron_dgrpo.testing.
distributed`)."""

from __future__ import annotations

from typing import Any


def train_runs(rank: int, world_size: int, config_dicts: list[dict[str, Any]]) -> list[int]:
    """Worker for :func:`~megatron_dgrpo.parallel.launch.run_distributed`: one training
    run per config dict, one after the other in this process (one start-up for all), model
    parallelism torn down between them. Returns each run's exit code."""
    from megatron_dgrpo.config import from_dict
    from megatron_dgrpo.models.provider import destroy_parallel
    from megatron_dgrpo.train.config import RunConfig
    from megatron_dgrpo.train.runner import run_training

    codes = []
    for config_dict in config_dicts:
        codes.append(run_training(from_dict(RunConfig, config_dict), show_progress=False))
        destroy_parallel()
    return codes
