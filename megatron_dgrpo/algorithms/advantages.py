"""Group-relative advantages and per-token advantage shaping.

A GRPO batch holds ``num_groups`` prompts with ``group_size`` sampled responses each, laid
out contiguously: responses ``[g * group_size, (g + 1) * group_size)`` share prompt ``g``.
Advantages are computed once for the whole global batch, before it is split over
microbatches or ranks, so every split sees the same numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_dgrpo.algorithms.checks import require_finite


def group_advantages(rewards: Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-6, unbiased_std: bool = False) -> Tensor:
    """Sequence-level advantages ``A_i = (R_i - mean_g R) / (std_g R + eps)``.

    Args:
        rewards: ``[num_groups * group_size]`` scalar reward per response (any float dtype).
        group_size: responses per prompt, ``G >= 1``.
        scale_by_std: divide by the group's standard deviation (GRPO); when False only the
            group mean is subtracted (Dr. GRPO).
        eps: added to the standard deviation so that constant-reward groups give 0.
        unbiased_std: the sample standard deviation (divide by ``G - 1``, as verl and TRL
            compute it) instead of the population one (divide by ``G``, the default).

    Returns:
        ``[num_groups * group_size]`` advantages, same dtype as ``rewards``, no grad.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [num_responses], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the number of "
                         f"rewards ({rewards.numel()})")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    require_finite("rewards", rewards)
    grouped = rewards.detach().reshape(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        if unbiased_std and group_size < 2:
            raise ValueError("the unbiased group std needs group_size >= 2")
        centered = centered / (grouped.std(dim=1, unbiased=unbiased_std, keepdim=True) + eps)
    return centered.reshape(-1)


def broadcast_to_tokens(sequence_advantages: Tensor, loss_mask: Tensor) -> Tensor:
    """Per-token advantages ``[B, T]``: ``A_i`` on the loss tokens of row ``i``, 0 elsewhere.

    Args:
        sequence_advantages: ``[B]``.
        loss_mask: ``[B, T]`` bool, True on response tokens that enter the loss.
    """
    if sequence_advantages.shape != loss_mask.shape[:1] or loss_mask.dim() != 2:
        raise ValueError(f"sequence_advantages {tuple(sequence_advantages.shape)} must be [B] "
                         f"for loss_mask [B, T] {tuple(loss_mask.shape)}")
    return torch.where(loss_mask, sequence_advantages[:, None], 0.0).to(sequence_advantages.dtype)


def shape_token_advantages(token_advantages: Tensor, student_logp: Tensor, teacher_logp: Tensor,
                           coef: float) -> Tensor:
    """Dense teacher shaping ``A_it - coef * (log pi_student - log pi_teacher)``, detached.

    With ``token_advantages = 0`` and ``coef = 1`` this is the on-policy-distillation
    advantage (the per-token reverse KL as a negative reward); with GRPO advantages it is
    dGRPO's advantage-shaping form. All tensors share one shape (e.g. ``[N]`` tokens);
    log-probs are natural-log probabilities of the sampled tokens.
    """
    log_ratio = student_logp.detach() - teacher_logp.detach()
    return token_advantages.detach() - coef * log_ratio
