"""Micro-batches of a step: groups of rows (sequences), each trimmed to its own length.

A step's batch is ``[B, T]`` right-padded to its longest sequence. A micro-batch is rows
``[start, stop)`` cut to ``width`` columns: one past the last loss position of its rows,
rounded up to the layout's alignment (``align``; ``T`` is a multiple of it too). Under
causal attention the dropped columns (padding, or the final token, which predicts nothing)
cannot change the earlier positions, so per-token results of a micro-batch equal those of
the full batch at the same positions. Loss weights stay the ones computed for the whole
global batch, so the micro-batch losses add up to the step's loss exactly.

With context parallelism (``cp_size > 1``) a micro-batch hands out only this CP rank's
load-balanced ``[rows, width / cp_size]`` shard of every per-token tensor
(:func:`megatron_dgrpo.parallel.context.cp_shard`); ``width`` is then a multiple of
``2 * cp_size``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from megatron_dgrpo.algorithms.inputs import TokenBatch
from megatron_dgrpo.parallel.context import cp_shard
from megatron_dgrpo.train.sequences import SequenceBatch


@dataclass(frozen=True)
class MicroBatch:
    """Rows ``[start, stop)`` of the step's batch, columns ``[0, width)``; with
    ``cp_size > 1``, CP rank ``cp_rank``'s shard of those columns."""

    start: int
    stop: int
    width: int
    cp_rank: int = 0
    cp_size: int = 1

    def _part(self, tensor: torch.Tensor) -> torch.Tensor:
        part = tensor[self.start:self.stop, :self.width]
        return part if self.cp_size == 1 else cp_shard(part, self.cp_rank, self.cp_size)

    def sequences(self, batch: SequenceBatch) -> SequenceBatch:
        """The micro-batch's ``[stop - start, width / cp_size]`` part of ``batch``."""
        return SequenceBatch(*(self._part(getattr(batch, f.name)) for f in fields(SequenceBatch)))

    def tokens(self, batch: TokenBatch) -> TokenBatch:
        """The micro-batch's part of every per-token tensor (top-k ones keep their ``K``)."""
        return replace(batch, **{f.name: None if getattr(batch, f.name) is None
                                 else self._part(getattr(batch, f.name))
                                 for f in fields(batch)})


def plan_micro_batches(loss_mask: torch.Tensor, size: int | None, align: int = 1,
                       cp_rank: int = 0, cp_size: int = 1) -> list[MicroBatch]:
    """Consecutive groups of ``size`` rows (``None``: one group of all rows) of a
    ``[B, T]`` loss mask, each with its trimmed width (>= 1) rounded up to a multiple of
    ``align`` (``T`` must be one; with ``cp_size > 1``, ``align`` a multiple of
    ``2 * cp_size``)."""
    rows, length = loss_mask.shape
    if length % align or (cp_size > 1 and align % (2 * cp_size)):
        raise ValueError(f"batch width {length} and alignment {align} do not fit context "
                         f"parallelism over {cp_size} ranks (need width % align == 0 and "
                         f"align % {2 * cp_size} == 0)")
    size = size or rows
    plan = []
    for start in range(0, rows, size):
        stop = min(start + size, rows)
        used = torch.nonzero(loss_mask[start:stop].any(dim=0))
        width = int(used[-1]) + 1 if len(used) else 1
        plan.append(MicroBatch(start, stop, -(-width // align) * align, cp_rank, cp_size))
    return plan
