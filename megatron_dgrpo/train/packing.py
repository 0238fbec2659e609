"""Packed micro-batches (``pack_sequences``): rows of the step batch back to back in one row.

A right-padded micro-batch runs ``rows x width`` positions, ``width`` set by its longest
row; when response lengths vary most of them are padding. A pack instead lays each row's
used tokens (up to and including its last loss position, :func:`~megatron_dgrpo.train.
batch.used_lengths`) one after the other in a single ``[1, L]`` row, Megatron's THD layout
(``cu_seqlens``: where each sequence starts; each one padded to a multiple of ``align``).
Attention stays within each sequence and rotary positions restart at 0 in each
(:func:`~megatron_dgrpo.models.forward.thd_params`), so every per-token result equals the
padded micro-batch's at the same token. Rows are assigned to packs of at most
``pack_tokens`` tokens first-fit decreasing (:func:`megatron_dgrpo.data.pack.plan_packs`);
a row longer than the budget gets a pack of its own, and rows without loss tokens are left
out (they add nothing to the loss or its metrics).

:class:`PackedMicroBatch` has the interface of :class:`~megatron_dgrpo.train.batch.
MicroBatch`: ``sequences`` / ``tokens`` gather its ``[1, L]`` part of the step batch's
tensors, ``place`` scatters per-token results back, ``stage_input`` adds the THD
parameters. With context parallelism (``cp_size > 1``) every sequence of a pack is cut
into ``2 x CP`` chunks of its own and CP rank ``r`` holds chunks ``r`` and ``2 x CP - 1 - r``
of each, sequence after sequence (Megatron's THD context-parallel layout,
:func:`~megatron_dgrpo.parallel.context.cp_shard_segments`); ``align`` is then a multiple
of ``2 x CP``, and ``place`` gathers the shards back.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import cached_property

import torch
from torch import Tensor

from megatron_dgrpo.algorithms.inputs import TokenBatch
from megatron_dgrpo.data.pack import aligned, plan_packs
from megatron_dgrpo.models.forward import StageInput
from megatron_dgrpo.parallel.collectives import all_gather_tensors
from megatron_dgrpo.parallel.context import cp_shard_segments, cp_unshard_segments
from megatron_dgrpo.rollout.sequences import SequenceBatch
from megatron_dgrpo.train.batch import used_lengths


@dataclass(frozen=True)
class PackedMicroBatch:
    """Rows ``rows`` of the step batch, row ``rows[i]``'s first ``lengths[i]`` tokens at
    ``[offsets[i], offsets[i] + lengths[i])`` of one packed row, each followed by padding to
    a multiple of ``align``; with ``cp_size > 1``, CP rank ``cp_rank``'s shard of every
    sequence (``align`` a multiple of ``2 * cp_size``)."""

    rows: tuple[int, ...]
    lengths: tuple[int, ...]
    align: int = 1
    cp_rank: int = 0
    cp_size: int = 1

    def __post_init__(self):
        if self.cp_size > 1 and self.align % (2 * self.cp_size):
            raise ValueError(f"packs over {self.cp_size} CP ranks need an alignment that is a "
                             f"multiple of {2 * self.cp_size}, got {self.align}")

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Where each sequence starts, and the packed width last (``cu_seqlens_padded``)."""
        starts = [0]
        for length in self.lengths:
            starts.append(starts[-1] + aligned(length, self.align))
        return tuple(starts)

    @property
    def width(self) -> int:
        return self.offsets[-1]

    @property
    def computed_tokens(self) -> int:
        """Token positions the forward runs over (all CP ranks together), alignment padding
        included."""
        return self.width

    def _shard(self, tensor: Tensor) -> Tensor:
        """This CP rank's part of a ``[1, L, ...]`` packed tensor."""
        return tensor if self.cp_size == 1 else cp_shard_segments(tensor, self.offsets,
                                                                  self.cp_rank, self.cp_size)

    def _layout(self, batch_width: int, device) -> tuple[Tensor, Tensor, Tensor]:
        """``[L]``: flat index into the step batch's ``[B, T]`` tensors, whether the token
        is real (not alignment padding), and its position within its sequence."""
        index, real, position = [], [], []
        for row, length, start, stop in zip(self.rows, self.lengths, self.offsets,
                                            self.offsets[1:]):
            steps = torch.arange(stop - start)
            position.append(steps)
            real.append(steps < length)
            index.append(row * batch_width + steps.clamp(max=length - 1))
        return tuple(torch.cat(parts).to(device) for parts in (index, real, position))

    def _gather(self, tensor: Tensor, index: Tensor) -> Tensor:
        flat = tensor.reshape(-1, *tensor.shape[2:])
        return flat.index_select(0, index)[None]

    def sequences(self, batch: SequenceBatch) -> SequenceBatch:
        """The pack's ``[1, L / cp_size]`` sequences: tokens and targets of the rows (0 on
        padding), positions restarting at 0 per sequence, the loss mask off on padding."""
        index, real, position = self._layout(batch.tokens.shape[1], batch.tokens.device)
        part = batch.map(lambda tensor: self._gather(tensor, index))
        packed = SequenceBatch(tokens=torch.where(real, part.tokens, 0), positions=position[None],
                               targets=torch.where(real, part.targets, 0),
                               loss_mask=part.loss_mask & real)
        return packed.map(self._shard)

    def tokens(self, batch: TokenBatch) -> TokenBatch:
        """The pack's ``[1, L / cp_size]`` part of every per-token tensor (top-k ones keep
        their ``K``), the loss mask off on padding."""
        index, real, _ = self._layout(batch.loss_mask.shape[1], batch.loss_mask.device)
        part = replace(batch, **{f.name: None if getattr(batch, f.name) is None
                                 else self._shard(self._gather(getattr(batch, f.name), index))
                                 for f in fields(batch)})
        part.loss_mask = part.loss_mask & self._shard(real[None])
        return part

    def stage_input(self, part: SequenceBatch) -> StageInput:
        """The model inputs of ``part`` (this pack's :meth:`sequences`) with its THD
        boundaries."""
        from megatron_dgrpo.models.forward import thd_params

        device = part.tokens.device
        real = torch.tensor([0, *self.lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        padded = torch.tensor(self.offsets, dtype=torch.int32)
        return StageInput(part.tokens, part.positions, thd_params(real.to(device),
                                                                  padded.to(device)))

    def place(self, out: Tensor, values: Tensor, cp_group=None) -> None:
        """Write the pack's per-token ``values`` (this CP rank's ``[1, L / cp_size]``;
        gathered over ``cp_group``) back to the rows of the step batch's ``[B, T]`` tensor
        ``out``."""
        if self.cp_size > 1:
            values = cp_unshard_segments(all_gather_tensors(values, cp_group), self.offsets)
        index, real, _ = self._layout(out.shape[1], out.device)
        out.view(-1)[index[real]] = values[0][real].to(out.dtype)


def plan_packed_micro_batches(loss_mask: Tensor, pack_tokens: int | None, align: int = 1,
                              cp_rank: int = 0, cp_size: int = 1) -> list[PackedMicroBatch]:
    """The packs of a ``[B, T]`` loss mask's rows: at most ``pack_tokens`` tokens each
    (``None``: one pack of every row), first-fit decreasing; one pack of its own for a row
    longer than that; rows without loss tokens left out (when no row has one, row 0's first
    token stays, so every rank runs a micro-batch and reports the same metric names). With
    ``cp_size > 1`` each pack hands out CP rank ``cp_rank``'s shard."""
    lengths = used_lengths(loss_mask)
    rows = [row for row, length in enumerate(lengths) if length > 0]
    if not rows:
        return [PackedMicroBatch((0,), (1,), align, cp_rank, cp_size)]
    sizes = [lengths[row] for row in rows]
    budget = pack_tokens or sum(aligned(size, align) for size in sizes)
    packs, too_long = plan_packs(sizes, budget, align)
    packs += [[index] for index in too_long]
    return [PackedMicroBatch(tuple(rows[i] for i in pack), tuple(sizes[i] for i in pack), align,
                             cp_rank, cp_size)
            for pack in packs]
