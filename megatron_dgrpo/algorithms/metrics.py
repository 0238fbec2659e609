"""Detached loss metrics that combine exactly over microbatches and ranks.

Means are stored as weighted sums ``sum_t w_t * x_t`` with the loss's aggregation weights,
so, like the loss, they *add up* over the pieces of a global batch (sum over microbatches
and over DP/CP ranks; TP ranks hold identical values). Extremes combine by min/max.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class LossMetrics:
    """``means[name]``: scalar weighted mean over loss tokens (e.g. ``clip_frac_low``,
    ``kl_teacher``, ``entropy``, ``ratio_mean``); ``minima[name]`` / ``maxima[name]``:
    scalar extremes over loss tokens (``+inf`` / ``-inf`` when there are none)."""

    means: dict[str, Tensor] = field(default_factory=dict)
    minima: dict[str, Tensor] = field(default_factory=dict)
    maxima: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def from_tokens(cls, loss_mask: Tensor, weights: Tensor, means: dict[str, Tensor],
                    extremes: dict[str, Tensor]) -> LossMetrics:
        """Reduce per-token values (``[N]``) over the tokens where ``loss_mask`` is True."""
        weight = torch.where(loss_mask, weights, 0.0).detach()
        summed = {name: (weight * torch.where(loss_mask, value.detach(), 0.0).to(weight.dtype)).sum()
                  for name, value in means.items()}
        inf = torch.tensor(float("inf"), dtype=weight.dtype, device=weight.device)
        minima = {name: torch.where(loss_mask, value.detach().to(weight.dtype), inf).min()
                  if value.numel() else inf for name, value in extremes.items()}
        maxima = {name: torch.where(loss_mask, value.detach().to(weight.dtype), -inf).max()
                  if value.numel() else -inf for name, value in extremes.items()}
        return cls(summed, minima, maxima)

    def merge(self, other: LossMetrics) -> LossMetrics:
        """Combine two disjoint pieces of the same global batch."""
        return LossMetrics(
            means=_combine(self.means, other.means, torch.add),
            minima=_combine(self.minima, other.minima, torch.minimum),
            maxima=_combine(self.maxima, other.maxima, torch.maximum),
        )

    @staticmethod
    def average(pieces: list[LossMetrics]) -> LossMetrics:
        """Metrics of several updates, each already complete (reduced over its batch): means
        averaged over the updates, extremes over all of them."""
        if len(pieces) == 1:
            return pieces[0]
        merged = LossMetrics()
        for piece in pieces:
            merged = merged.merge(piece)
        return LossMetrics({name: value / len(pieces) for name, value in merged.means.items()},
                           merged.minima, merged.maxima)

    def to(self, device: torch.device | str) -> LossMetrics:
        """The same metrics with every value on ``device``."""
        return LossMetrics(*({name: value.to(device) for name, value in part.items()}
                             for part in (self.means, self.minima, self.maxima)))

    def as_dict(self) -> dict[str, float]:
        """Flat ``{name: float}`` for logging: means as is, extremes as ``name_min/_max``."""
        flat = {name: float(value) for name, value in self.means.items()}
        flat.update({f"{name}_min": float(value) for name, value in self.minima.items()})
        flat.update({f"{name}_max": float(value) for name, value in self.maxima.items()})
        return flat


def _combine(left: dict[str, Tensor], right: dict[str, Tensor], op) -> dict[str, Tensor]:
    combined = dict(left)
    for name, value in right.items():
        combined[name] = op(combined[name], value) if name in combined else value
    return combined
