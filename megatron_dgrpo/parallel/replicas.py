"""Model replicas: the ranks that together hold one copy of the model.

A replica is every rank with the same data-parallel rank (its TP x CP x PP ranks). Per
replica, one rank (the lowest, its *leader*: TP, CP and pipeline rank 0) can host a
rollout engine that serves the replica's own prompts, with the replica's ranks streaming
weights to it; :func:`model_replica` builds a process group per replica for that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_dgrpo.parallel.collectives import all_gather_objects, new_group, world_rank


@dataclass(frozen=True)
class Replica:
    """``index``: the replica's data-parallel rank; ``ranks``: its global ranks, lowest
    first; ``group``: a process group over exactly those ranks."""

    index: int
    ranks: tuple[int, ...]
    group: Any

    @property
    def leader(self) -> int:
        """The global rank that speaks for the replica (hosts its engine)."""
        return self.ranks[0]

    @property
    def is_leader(self) -> bool:
        return world_rank() == self.leader


def model_replica() -> Replica:
    """This rank's replica (after Megatron's model parallelism is initialised). Collective:
    call on every rank, in the same order relative to other group creations."""
    from megatron.core import parallel_state as ps

    index = ps.get_data_parallel_rank()
    indices = all_gather_objects(index)
    mine = None
    for replica in sorted(set(indices)):  # every rank creates every group, in one order
        ranks = tuple(rank for rank, i in enumerate(indices) if i == replica)
        group = new_group(list(ranks))
        if replica == index:
            mine = Replica(index, ranks, group)
    return mine
