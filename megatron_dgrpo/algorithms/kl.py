"""KL estimators between the trained policy and an anchor (reference or teacher).

Conventions: ``logp`` are natural-log probabilities under the distribution KL is taken
*from* (P in KL(P || Q)), ``logq`` under the one it is taken *to*. Reverse KL
KL(student || anchor) passes the student as P; the forward KL of KD passes the teacher as P.
All results are in nats, one value per token.

The sampled estimators are evaluated at a token ``y ~ P`` (P = the trained policy
``pi_theta``, Q = the anchor). Their value and, when differentiated as a loss w.r.t. the
policy's parameters, their expected gradient ``E_{y~P}[grad est(y)]`` (with
``grad KL(P||Q) = E_P[(log p - log q) grad log p]`` and ``E_P[grad log p] = 0``):

=========  ===============================  ==========================  =======================
estimator  per token                        E[value]                    E[gradient] as a loss
=========  ===============================  ==========================  =======================
``k1``     ``log p - log q``                KL(P || Q) (unbiased)       0: trains nothing
``k2``     ``(log p - log q)^2 / 2``        >= KL (biased, 2nd order)   grad KL(P || Q) (reverse)
``k3``     ``q/p - log(q/p) - 1``           KL(P || Q) (unbiased, >= 0) grad KL(Q || P) (forward)
``full``   ``sum_v p(v) log(p(v) / q(v))``  KL(P || Q) exactly          grad KL(P || Q) exactly
=========  ===============================  ==========================  =======================

So the reverse-KL objectives use ``full`` (exact, needs the anchor's logits) or ``k2``;
``k1`` is only meaningful as a per-token *advantage* (``-(log p - log q)`` as a reward, whose
policy gradient is ``-grad KL(P || Q)``); ``k3`` as a loss is the convention of verl and
DeepSeek-R1's GRPO (its value estimates the reverse KL but its gradient is the forward KL's).
``tests/algorithms/test_kl_gradients.py`` checks every row by exact enumeration.
"""

from __future__ import annotations

import torch
from torch import Tensor

SAMPLED_ESTIMATORS = ("k1", "k2", "k3")
TOPK_TAILS = ("bucket", "renormalize")


def sampled_token_kl(logp: Tensor, logq: Tensor, estimator: str) -> Tensor:
    """Single-sample estimate of KL(P || Q) at tokens drawn from P.

    ``k1 = logp - logq``, ``k2 = (logp - logq)^2 / 2``,
    ``k3 = exp(logq - logp) - (logq - logp) - 1`` (unbiased, always >= 0).

    Args:
        logp, logq: same shape (e.g. ``[N]``), log-probs of the sampled tokens.
        estimator: one of ``k1``, ``k2``, ``k3``.
    """
    log_ratio = logp - logq
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown sampled KL estimator {estimator!r}; choose one of {SAMPLED_ESTIMATORS}")


def full_vocab_kl(logp: Tensor, logq: Tensor) -> Tensor:
    """Exact ``sum_v p(v) (log p(v) - log q(v))`` over the last dim.

    Applied to one vocabulary shard (log-probs normalised over the *full* vocabulary) it
    gives that shard's additive part of the KL; shards' parts sum to the full value.

    Args:
        logp, logq: ``[..., V]`` log-probabilities. Returns ``[...]``.
    """
    return torch.einsum("...v,...v->...", logp.exp(), logp - logq)


def _with_tail(topk_logprobs: Tensor) -> Tensor:
    """Append ``log(1 - sum_k p_k)`` (the mass outside the top-k) as category K+1."""
    covered = torch.logsumexp(topk_logprobs, dim=-1, keepdim=True)
    tail_mass = -torch.expm1(covered.clamp(max=0.0))
    tail = torch.log(tail_mass.clamp(min=torch.finfo(topk_logprobs.dtype).tiny))
    return torch.cat([topk_logprobs, tail], dim=-1)


def topk_kl(logp_topk: Tensor, logq_topk: Tensor, tail: str = "bucket") -> Tensor:
    """KL(P || Q) restricted to a fixed set of K tokens (the teacher's top-k).

    Args:
        logp_topk, logq_topk: ``[..., K]`` full-vocabulary log-probs of P and Q at the same
            K token ids.
        tail: ``"bucket"`` adds a (K+1)-th category holding each distribution's remaining
            mass, so both stay normalised and no renormalisation is needed;
            ``"renormalize"`` renormalises both over the K tokens and drops the rest.

    Returns:
        ``[...]`` KL in nats.
    """
    if tail == "bucket":
        logp_cat, logq_cat = _with_tail(logp_topk), _with_tail(logq_topk)
    elif tail == "renormalize":
        logp_cat = torch.log_softmax(logp_topk, dim=-1)
        logq_cat = torch.log_softmax(logq_topk, dim=-1)
    else:
        raise ValueError(f"unknown top-k tail {tail!r}; choose one of {TOPK_TAILS}")
    return full_vocab_kl(logp_cat, logq_cat)
