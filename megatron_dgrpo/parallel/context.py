"""Context parallelism: load-balanced sequence sharding and global normalisers.

Load-balanced layout (causal attention costs grow along the sequence, so every rank gets
one early and one late piece): a sequence of length T is cut into ``2 * cp_size`` equal
chunks and CP rank ``r`` holds chunks ``r`` and ``2 * cp_size - 1 - r``, concatenated.
Packed (THD) rows are sharded sequence by sequence the same way (:func:`cp_shard_segments`).

Normalisers: the loss weights of :func:`megatron_dgrpo.algorithms.aggregation.token_weights`
must be computed from counts over the *global* batch, before it is split into microbatches.
The helpers here take all of this rank's microbatch masks and all-reduce over the DP and CP
groups (``None`` = that kind of parallelism is off), so every rank gets the same counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from megatron_dgrpo.algorithms.metrics import LossMetrics
from megatron_dgrpo.parallel.collectives import all_gather_tensors, all_reduce


def sequence_alignment(cp_size: int, tp_size: int, sequence_parallel: bool) -> int:
    """Sequence lengths must be multiples of this: ``2 * cp_size`` load-balanced chunks
    (with CP), each split over the TP ranks under sequence parallelism."""
    return (2 * cp_size if cp_size > 1 else 1) * (tp_size if sequence_parallel else 1)


def _chunks(length: int, cp_size: int) -> int:
    if cp_size < 1 or length % (2 * cp_size):
        raise ValueError(f"sequence length {length} must be divisible by 2 * cp_size = {2 * cp_size}")
    return length // (2 * cp_size)


def cp_shard(tensor: Tensor, cp_rank: int, cp_size: int, seq_dim: int = 1) -> Tensor:
    """This CP rank's ``[..., T / cp_size, ...]`` part of ``tensor`` (``T`` along ``seq_dim``):
    chunks ``cp_rank`` and ``2 * cp_size - 1 - cp_rank`` of ``2 * cp_size``."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} must be in [0, {cp_size})")
    size = _chunks(tensor.shape[seq_dim], cp_size)
    first = tensor.narrow(seq_dim, cp_rank * size, size)
    second = tensor.narrow(seq_dim, (2 * cp_size - 1 - cp_rank) * size, size)
    return torch.cat([first, second], dim=seq_dim)


def cp_unshard(shards: Sequence[Tensor], seq_dim: int = 1) -> Tensor:
    """Inverse of :func:`cp_shard`: the full tensor from the shards of ranks ``0..cp_size-1``."""
    cp_size = len(shards)
    if cp_size < 1 or shards[0].shape[seq_dim] % 2:
        raise ValueError(f"need >= 1 shard with an even length along dim {seq_dim}")
    size = shards[0].shape[seq_dim] // 2
    chunks: list[Tensor | None] = [None] * (2 * cp_size)
    for rank, shard in enumerate(shards):
        chunks[rank] = shard.narrow(seq_dim, 0, size)
        chunks[2 * cp_size - 1 - rank] = shard.narrow(seq_dim, size, size)
    return torch.cat(chunks, dim=seq_dim)


def cp_shard_segments(tensor: Tensor, offsets: Sequence[int], cp_rank: int, cp_size: int,
                      seq_dim: int = 1) -> Tensor:
    """This CP rank's part of a packed (THD) ``tensor`` whose sequences lie at
    ``[offsets[i], offsets[i + 1])`` along ``seq_dim`` (``offsets[-1]`` = its length; every
    sequence's length a multiple of ``2 * cp_size``): each sequence's own :func:`cp_shard`,
    back to back, so sequence ``i`` sits at ``[offsets[i] / cp_size, offsets[i + 1] /
    cp_size)`` of the result (Megatron's THD context-parallel layout)."""
    if offsets[0] != 0 or offsets[-1] != tensor.shape[seq_dim]:
        raise ValueError(f"segments [{offsets[0]}, {offsets[-1]}) must cover the "
                         f"{tensor.shape[seq_dim]} positions along dim {seq_dim}")
    return torch.cat([cp_shard(tensor.narrow(seq_dim, start, stop - start), cp_rank, cp_size,
                               seq_dim)
                      for start, stop in zip(offsets[:-1], offsets[1:])], dim=seq_dim)


def cp_unshard_segments(shards: Sequence[Tensor], offsets: Sequence[int],
                        seq_dim: int = 1) -> Tensor:
    """Inverse of :func:`cp_shard_segments`: the packed tensor from the shards of ranks
    ``0..cp_size-1`` (``offsets`` as there, in full-sequence positions)."""
    cp_size = len(shards)
    return torch.cat([cp_unshard([shard.narrow(seq_dim, start // cp_size,
                                               (stop - start) // cp_size) for shard in shards],
                                 seq_dim=seq_dim)
                      for start, stop in zip(offsets[:-1], offsets[1:])], dim=seq_dim)


def cp_all_gather(shard: Tensor, group, seq_dim: int = 1) -> Tensor:
    """The full tensor from every CP rank's :func:`cp_shard` of it (no autograd; ``group``
    ``None`` or of size 1: ``shard`` itself)."""
    parts = all_gather_tensors(shard, group)
    return shard if len(parts) == 1 else cp_unshard(parts, seq_dim=seq_dim)


def _as_list(loss_masks: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [loss_masks] if isinstance(loss_masks, Tensor) else list(loss_masks)


def sequence_token_counts(loss_mask: Tensor, cp_group=None) -> Tensor:
    """``[B]`` int64 loss tokens of each sequence over all its CP shards (``loss_mask``:
    this rank's ``[B, T_local]`` shard)."""
    return all_reduce(loss_mask.sum(dim=1), "sum", cp_group)


def global_token_count(loss_masks: Tensor | Sequence[Tensor], dp_group=None, cp_group=None) -> Tensor:
    """Scalar int64: loss tokens in the global batch (all microbatches, DP and CP ranks)."""
    local = torch.stack([mask.sum() for mask in _as_list(loss_masks)]).sum()
    return all_reduce(all_reduce(local, "sum", cp_group), "sum", dp_group)


def global_sequence_count(loss_masks: Tensor | Sequence[Tensor], dp_group=None, cp_group=None) -> Tensor:
    """Scalar int64: sequences with at least one loss token in the global batch (CP ranks
    hold the same sequences, so they are counted once)."""
    local = torch.stack([(sequence_token_counts(mask, cp_group) > 0).sum()
                         for mask in _as_list(loss_masks)]).sum()
    return all_reduce(local, "sum", dp_group)


def all_reduce_metrics(metrics: LossMetrics, group=None) -> LossMetrics:
    """Global metrics from each rank's (already microbatch-merged) metrics: means summed,
    extremes min/max-reduced over ``group`` (the DP x CP group; TP ranks agree already).
    Every rank must hold the same metric names."""
    names = sorted(metrics.means)
    means = all_reduce(torch.stack([metrics.means[n] for n in names]), "sum", group) \
        if names else None
    minima_names, maxima_names = sorted(metrics.minima), sorted(metrics.maxima)
    minima = all_reduce(torch.stack([metrics.minima[n] for n in minima_names]), "min", group) \
        if minima_names else None
    maxima = all_reduce(torch.stack([metrics.maxima[n] for n in maxima_names]), "max", group) \
        if maxima_names else None
    return LossMetrics(
        means={n: means[i] for i, n in enumerate(names)},
        minima={n: minima[i] for i, n in enumerate(minima_names)},
        maxima={n: maxima[i] for i, n in enumerate(maxima_names)},
    )
