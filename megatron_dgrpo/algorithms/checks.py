"""Input checks shared by the loss code: every failure is a ValueError naming the tensor."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def require_finite(name: str, tensor: Tensor, where: Tensor | None = None) -> None:
    """Raise if ``tensor`` holds NaN or +-inf (only at positions where ``where``, a mask
    broadcastable to ``tensor``, is True)."""
    values = tensor.detach()
    if where is not None:
        values = values[where.expand_as(values)]
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def require_shape(name: str, tensor: Tensor, shape: Sequence[int], meaning: str) -> None:
    """Raise unless ``tensor.shape == shape``; ``meaning`` names the dims, e.g. ``'[N]'``."""
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {meaning}={tuple(shape)}, "
                         f"got {tuple(tensor.shape)}")
