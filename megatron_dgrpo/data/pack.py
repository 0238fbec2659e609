"""Pack variable-length (prompt, response) sequences into fixed token budgets, THD layout.

Each pack is one row of ``budget`` tokens holding several sequences back to back (Megatron's
``qkv_format="thd"``): ``cu_seqlens`` (int32, ``[num_seqs + 1]``) are the cumulative real lengths,
``cu_seqlens_padded`` the cumulative lengths after padding each sequence to a multiple of
``align`` (use ``2 * context_parallel_size`` for CP); sequence ``i`` occupies tokens
``cu_seqlens_padded[i] : cu_seqlens_padded[i] + len_i``. Positions restart at 0 per sequence. The
tail after ``cu_seqlens_padded[-1]`` and per-sequence alignment padding hold ``pad_id``.

Masks, all ``[budget]``: ``response_mask[t]`` marks response tokens; ``labels[t]`` is the next token
of the same sequence (``IGNORE_INDEX`` where there is none); ``loss_mask[t]`` is 1.0 where
``labels[t]`` is a response token, i.e. the loss on prompt tokens is masked. Packing is first-fit
decreasing (stable on ties); sequences longer than the budget are dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Sample:
    """One sequence to pack: prompt token ids then response token ids."""

    prompt_ids: list[int]
    response_ids: list[int]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass(frozen=True)
class PackedBatch:
    """One pack in THD layout (see the module docstring for every field's meaning)."""

    tokens: torch.Tensor  # [budget] int64
    position_ids: torch.Tensor  # [budget] int64
    labels: torch.Tensor  # [budget] int64
    loss_mask: torch.Tensor  # [budget] float32
    response_mask: torch.Tensor  # [budget] bool
    cu_seqlens: torch.Tensor  # [num_seqs + 1] int32
    cu_seqlens_padded: torch.Tensor  # [num_seqs + 1] int32
    sample_indices: list[int]  # input positions of the packed samples, in pack order


@dataclass(frozen=True)
class PackingReport:
    """Packing efficiency: real tokens over the capacity of all packs."""

    num_samples: int
    num_dropped: int
    num_packs: int
    real_tokens: int
    capacity_tokens: int

    @property
    def efficiency(self) -> float:
        return self.real_tokens / self.capacity_tokens if self.capacity_tokens else 0.0

    def format(self) -> str:
        return (
            f"{self.num_samples - self.num_dropped}/{self.num_samples} samples in {self.num_packs} packs, "
            f"efficiency {self.efficiency:.1%} ({self.real_tokens}/{self.capacity_tokens} tokens), "
            f"{self.num_dropped} dropped as longer than the budget"
        )


def aligned(length: int, align: int) -> int:
    """``length`` rounded up to a multiple of ``align``."""
    return -(-length // align) * align


def plan_packs(lengths: list[int], budget: int, align: int = 1) -> tuple[list[list[int]], list[int]]:
    """First-fit decreasing: (packs as lists of input indices, indices dropped as too long)."""
    if budget <= 0 or align <= 0:
        raise ValueError(f"budget and align must be positive, got budget={budget}, align={align}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    packs: list[list[int]] = []
    free: list[int] = []
    dropped: list[int] = []
    for index in order:
        size = aligned(lengths[index], align)
        if size > budget:
            dropped.append(index)
            continue
        target = next((p for p, room in enumerate(free) if room >= size), None)
        if target is None:
            packs.append([])
            free.append(budget)
            target = len(packs) - 1
        packs[target].append(index)
        free[target] -= size
    return packs, sorted(dropped)


def build_pack(
    samples: list[Sample], indices: list[int], budget: int, pad_id: int = 0, align: int = 1
) -> PackedBatch:
    """Lay out ``samples[indices]`` in one pack of ``budget`` tokens."""
    tokens = torch.full((budget,), pad_id, dtype=torch.long)
    positions = torch.zeros(budget, dtype=torch.long)
    labels = torch.full((budget,), IGNORE_INDEX, dtype=torch.long)
    response_mask = torch.zeros(budget, dtype=torch.bool)
    cu, cu_padded = [0], [0]
    for index in indices:
        sample = samples[index]
        ids = torch.tensor(sample.prompt_ids + sample.response_ids, dtype=torch.long)
        start, length = cu_padded[-1], len(sample)
        end = start + length
        tokens[start:end] = ids
        positions[start:end] = torch.arange(length)
        labels[start : end - 1] = ids[1:]
        response_mask[start + len(sample.prompt_ids) : end] = True
        cu.append(cu[-1] + length)
        cu_padded.append(start + aligned(length, align))
    if cu_padded[-1] > budget:
        raise ValueError(f"samples {indices} need {cu_padded[-1]} tokens, more than the budget {budget}")
    loss_mask = torch.zeros(budget, dtype=torch.float32)
    loss_mask[:-1] = (response_mask[1:] & (labels[:-1] != IGNORE_INDEX)).float()
    return PackedBatch(
        tokens,
        positions,
        labels,
        loss_mask,
        response_mask,
        torch.tensor(cu, dtype=torch.int32),
        torch.tensor(cu_padded, dtype=torch.int32),
        list(indices),
    )


def pack_samples(
    samples: list[Sample], budget: int, pad_id: int = 0, align: int = 1
) -> tuple[list[PackedBatch], PackingReport]:
    """Pack every sample that fits; returns the packs and the efficiency report."""
    if any(len(s) == 0 for s in samples):
        raise ValueError("cannot pack an empty sample (no prompt and no response tokens)")
    packs, dropped = plan_packs([len(s) for s in samples], budget, align)
    batches = [build_pack(samples, indices, budget, pad_id, align) for indices in packs]
    report = PackingReport(
        num_samples=len(samples),
        num_dropped=len(dropped),
        num_packs=len(batches),
        real_tokens=sum(len(samples[i]) for pack in packs for i in pack),
        capacity_tokens=len(batches) * budget,
    )
    return batches, report
