"""Policy-gradient terms: PPO clipped surrogate (clip-higher, dual clip) and truncated IS.

All tensors are per token and share one shape (e.g. ``[N]``); log-probs are natural logs
of the sampled tokens' probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Surrogate:
    """Per-token clipped surrogate and which clip was active (all ``[N]``).

    ``objective`` is to be *maximised*; ``ratio`` is ``pi_theta / pi_old`` (detached);
    ``clipped_low``: ratio < 1 - eps_low with A < 0 (lower clip zeroes the gradient);
    ``clipped_high``: ratio > 1 + eps_high with A > 0; ``dual_clipped``: A < 0 and
    ratio > dual_clip (the dual-clip bound is the active one).
    """

    objective: Tensor
    ratio: Tensor
    clipped_low: Tensor
    clipped_high: Tensor
    dual_clipped: Tensor


def clipped_surrogate(logp: Tensor, old_logp: Tensor, advantages: Tensor, eps_low: float,
                      eps_high: float, dual_clip: float | None = None) -> Surrogate:
    """``min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`` with ``r = exp(logp - old_logp)``.

    With ``dual_clip = c > 1`` the objective of negative-advantage tokens is further
    bounded below by ``c * A`` (Ye et al., 2020), so a huge ratio cannot blow up the loss.
    Gradients flow through ``logp`` only; ``old_logp`` and ``advantages`` are constants.
    """
    old_logp, advantages = old_logp.detach(), advantages.detach()
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages
    objective = torch.minimum(unclipped, clipped)
    plain_ratio = ratio.detach()
    negative = advantages < 0
    if dual_clip is None:
        dual_clipped = torch.zeros_like(negative)
    else:
        objective = torch.where(negative, torch.maximum(objective, dual_clip * advantages),
                                objective)
        dual_clipped = negative & (plain_ratio > dual_clip)
    return Surrogate(
        objective=objective,
        ratio=plain_ratio,
        clipped_low=negative & (plain_ratio < 1.0 - eps_low),
        clipped_high=(advantages > 0) & (plain_ratio > 1.0 + eps_high),
        dual_clipped=dual_clipped,
    )


@dataclass
class ImportanceWeight:
    """Truncated importance weight between trainer and rollout engine (all ``[N]``).

    ``ratio`` = ``pi_trainer_old / pi_rollout`` (uncapped, detached); ``weight`` =
    ``min(ratio, cap)``; ``capped``: where the cap was applied.
    """

    ratio: Tensor
    weight: Tensor
    capped: Tensor


def truncated_importance_weight(trainer_logp: Tensor, rollout_logp: Tensor,
                                cap: float | None) -> ImportanceWeight:
    """Correct for the rollout engine sampling from slightly different log-probs.

    Args:
        trainer_logp: the trainer's log-probs of the sampled tokens under the weights that
            generated them (``old_logp``).
        rollout_logp: the rollout engine's log-probs of the same tokens.
        cap: truncation ``C`` (TIS); ``None`` disables the correction (weight 1) while the
            ratio is still returned for monitoring.
    """
    ratio = torch.exp(trainer_logp.detach() - rollout_logp.detach())
    if cap is None:
        return ImportanceWeight(ratio, torch.ones_like(ratio), torch.zeros_like(ratio, dtype=torch.bool))
    return ImportanceWeight(ratio, ratio.clamp(max=cap), ratio > cap)
