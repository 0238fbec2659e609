"""Micro-batches of a step: groups of rows (sequences), each trimmed to its own length.

A step's batch is ``[B, T]`` right-padded to its longest sequence. A micro-batch is rows
``[start, stop)`` cut to ``width`` columns: one past the last loss position of its rows.
Under causal attention the dropped columns (padding, or the final token, which predicts
nothing) cannot change the earlier positions, so per-token results of a micro-batch equal
those of the full batch at the same positions. Loss weights stay the ones computed for the
whole global batch, so the micro-batch losses add up to the step's loss exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from megatron_dgrpo.algorithms.inputs import TokenBatch
from megatron_dgrpo.train.sequences import SequenceBatch


@dataclass(frozen=True)
class MicroBatch:
    """Rows ``[start, stop)`` of the step's batch, columns ``[0, width)``."""

    start: int
    stop: int
    width: int

    def sequences(self, batch: SequenceBatch) -> SequenceBatch:
        """The micro-batch's ``[stop - start, width]`` part of ``batch``."""
        return SequenceBatch(*(getattr(batch, f.name)[self.start:self.stop, :self.width]
                               for f in fields(SequenceBatch)))

    def tokens(self, batch: TokenBatch) -> TokenBatch:
        """The micro-batch's part of every per-token tensor (top-k ones keep their ``K``)."""
        return replace(batch, **{f.name: None if getattr(batch, f.name) is None
                                 else getattr(batch, f.name)[self.start:self.stop, :self.width]
                                 for f in fields(batch)})


def plan_micro_batches(loss_mask: torch.Tensor, size: int | None) -> list[MicroBatch]:
    """Consecutive groups of ``size`` rows (``None``: one group of all rows) of a
    ``[B, T]`` loss mask, each with its trimmed width (>= 1)."""
    rows = loss_mask.shape[0]
    size = size or rows
    plan = []
    for start in range(0, rows, size):
        stop = min(start + size, rows)
        used = torch.nonzero(loss_mask[start:stop].any(dim=0))
        width = int(used[-1]) + 1 if len(used) else 1
        plan.append(MicroBatch(start, stop, width))
    return plan
