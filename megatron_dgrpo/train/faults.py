"""Fault injection for the reliability tests (``tests/reliability``): the environment variable
``DGRPO_FAULT_INJECT`` names points of a training run where it fails on purpose. Unset (as
in every real run) each point is inert: one dictionary look-up.

    DGRPO_FAULT_INJECT="checkpoint.state@3,rollout.short@2x1,loss.nan@4:1"

Each comma-separated entry is ``POINT@STEP[xTIMES][:RANK]``: the point fires at 1-based
training step ``STEP``, on global rank ``RANK`` only (every rank if omitted), the first
``TIMES`` times it is reached in this process (every time if omitted).

=======================  ==================================================================
point                    where, and what happens when it fires
=======================  ==================================================================
checkpoint.rank_files    saving: this rank's files are in the temporary directory; SIGKILL
checkpoint.state         saving: ``trainer_state.json`` is written, the directory not yet
                         renamed into place; SIGKILL
checkpoint.renamed       saving: the checkpoint is in place, ``latest`` not yet moved; SIGKILL
checkpoint.pruning       saving: the oldest checkpoint is unmarked, not yet deleted; SIGKILL
loss.nan                 the step's loss, and so its gradients, become NaN
rollout.error            the rollout engine's ``generate`` raises
rollout.short            the rollout engine returns one sample fewer than asked
=======================  ==================================================================
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from megatron_dgrpo.parallel.collectives import world_rank

VARIABLE = "DGRPO_FAULT_INJECT"
POINTS = ("checkpoint.rank_files", "checkpoint.state", "checkpoint.renamed",
          "checkpoint.pruning", "loss.nan", "rollout.error", "rollout.short")


@dataclass
class _Entry:
    point: str
    step: int
    times: int | None
    rank: int | None
    fired: int = 0


def _parse(spec: str) -> list[_Entry]:
    entries = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        try:
            point, _, rest = item.partition("@")
            where, _, rank = rest.partition(":")
            step, _, times = where.partition("x")
            entry = _Entry(point, int(step), int(times) if times else None,
                           int(rank) if rank else None)
        except ValueError:
            raise ValueError(f"{VARIABLE}: {item!r} is not POINT@STEP[xTIMES][:RANK]") from None
        if point not in POINTS:
            raise ValueError(f"{VARIABLE}: unknown point {point!r}; known: {', '.join(POINTS)}")
        entries.append(entry)
    return entries


_entries: dict[str, list[_Entry]] = {}  # by the raw variable: parsed once per value


def fires(point: str, step: int) -> bool:
    """Whether ``point`` fires now (at 1-based ``step``); False when the variable is unset."""
    spec = os.environ.get(VARIABLE)
    if not spec:
        return False
    if spec not in _entries:
        _entries[spec] = _parse(spec)
    for entry in _entries[spec]:
        if (entry.point == point and entry.step == step
                and entry.rank in (None, world_rank())
                and (entry.times is None or entry.fired < entry.times)):
            entry.fired += 1
            return True
    return False


def kill_if_fires(point: str, step: int) -> None:
    """SIGKILL this process if ``point`` fires: it dies on the spot, as in a node failure."""
    if fires(point, step):
        os.kill(os.getpid(), signal.SIGKILL)
