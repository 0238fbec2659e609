"""Loss aggregation as fixed per-token weights built from *global* normalisers.

The loss of any piece of the global batch is ``sum_t w_t * loss_t`` over that piece's
tokens. Because the weights are computed from counts over the whole global batch (passed
in by the caller, see :mod:`megatron_dgrpo.parallel.context`), the pieces' losses add up
to the same total however tokens are split over microbatches, DP, CP or TP ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor

AGGREGATIONS = ("token_mean", "seq_mean", "constant_length")


def token_weights(loss_mask: Tensor, aggregation: str,
                  global_token_count: Tensor | float | None = None,
                  sequence_token_counts: Tensor | None = None,
                  global_sequence_count: Tensor | float | None = None,
                  dtype: torch.dtype = torch.float32,
                  length_norm: float | None = None) -> Tensor:
    """Per-token weights ``[B, T]`` of ``dtype`` (use the loss's dtype, e.g. float64 in tests).

    Args:
        loss_mask: ``[B, T]`` bool, tokens that enter the loss.
        aggregation: ``"token_mean"``: ``w = 1 / (loss tokens in the global batch)``;
            ``"seq_mean"``: ``w = 1 / (n_i * S)`` with ``n_i`` the loss tokens of sequence
            ``i`` (over all its CP shards) and ``S`` the sequences with ``n_i > 0`` in the
            global batch.
        global_token_count: scalar, for ``token_mean``; defaults to this mask's count.
        sequence_token_counts: ``[B]`` global ``n_i``, for ``seq_mean``; defaults to this
            mask's row sums (correct without CP).
        global_sequence_count: scalar ``S``, for ``seq_mean``; defaults to this mask's
            non-empty rows.

    Masked tokens, and everything when a count is 0 (an all-masked batch), get weight 0.
    """
    if loss_mask.dim() != 2 or loss_mask.dtype != torch.bool:
        raise ValueError(f"loss_mask must be a bool [B, T] tensor, got {loss_mask.dtype} "
                         f"{tuple(loss_mask.shape)}")
    if aggregation == "token_mean":
        count = loss_mask.sum() if global_token_count is None else global_token_count
        denominator = torch.as_tensor(count).expand(loss_mask.shape)
    elif aggregation == "seq_mean":
        row_counts = loss_mask.sum(dim=1) if sequence_token_counts is None else sequence_token_counts
        if tuple(row_counts.shape) != loss_mask.shape[:1]:
            raise ValueError(f"sequence_token_counts must have shape [B]={loss_mask.shape[:1]}, "
                             f"got {tuple(row_counts.shape)}")
        sequences = (row_counts > 0).sum() if global_sequence_count is None else global_sequence_count
        denominator = (torch.as_tensor(row_counts)[:, None] * torch.as_tensor(sequences))
        denominator = denominator.expand(loss_mask.shape)
    elif aggregation == "constant_length":
        if length_norm is None or not length_norm > 0:
            raise ValueError(f"aggregation='constant_length' needs length_norm > 0, got {length_norm}")
        sequences = loss_mask.shape[0] if global_sequence_count is None else global_sequence_count
        denominator = (torch.as_tensor(sequences) * length_norm).expand(loss_mask.shape)
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    denominator = denominator.to(dtype)
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(loss_mask & (denominator > 0), 1.0 / safe, torch.zeros_like(safe))
