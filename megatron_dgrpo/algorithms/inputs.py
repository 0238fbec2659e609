"""The per-token tensors an objective reads: the batch's signals and the student's terms.

Shapes: every per-token tensor has the shape ``S`` of ``loss_mask`` (``[B, T]`` or ``[N]``
flattened tokens); top-k tensors are ``[*S, K]``. Log-probs are natural logs of the
probabilities of the sampled (target) token.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from megatron_dgrpo.algorithms.checks import require_finite, require_shape

_PER_TOKEN_SIGNALS = ("advantages", "old_logp", "rollout_logp", "ref_logp", "teacher_logp")


@dataclass
class TokenBatch:
    """What the trainer knows about each token before the student's forward pass.

    Attributes:
        loss_mask: bool ``S``; True on tokens that enter the loss.
        weights: float ``S``; aggregation weights from
            :func:`megatron_dgrpo.algorithms.aggregation.token_weights` (global normalisers).
        targets: int64 ``S``; the sampled / label token id (global vocabulary index).
        advantages: ``S`` per-token advantages (GRPO/dGRPO), see ``advantages.py``.
        old_logp: ``S`` trainer log-probs under the policy that sampled (PPO ``pi_old``);
            ``None`` = fully on-policy (ratio 1, gradients identical).
        rollout_logp: ``S`` rollout engine's log-probs, for truncated importance sampling.
        ref_logp: ``S`` frozen reference policy's log-probs (GRPO anchor).
        teacher_logp: ``S`` teacher log-probs of the targets (cached/served), used by the
            sampled KL estimators and the advantage forms when no teacher logits are given.
        teacher_topk_indices: int64 ``[*S, K]`` the teacher's top-k token ids.
        teacher_topk_logp: ``[*S, K]`` the teacher's full-vocabulary log-probs at those ids.
    """

    loss_mask: Tensor
    weights: Tensor
    targets: Tensor
    advantages: Tensor | None = None
    old_logp: Tensor | None = None
    rollout_logp: Tensor | None = None
    ref_logp: Tensor | None = None
    teacher_logp: Tensor | None = None
    teacher_topk_indices: Tensor | None = None
    teacher_topk_logp: Tensor | None = None

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError naming the first malformed tensor (shape, dtype, range, NaN/inf)."""
        if self.loss_mask.dtype != torch.bool:
            raise ValueError(f"loss_mask must be bool, got {self.loss_mask.dtype}")
        shape = tuple(self.loss_mask.shape)
        require_shape("weights", self.weights, shape, "S")
        require_shape("targets", self.targets, shape, "S")
        require_finite("weights", self.weights)
        _require_token_ids("targets", self.targets, self.loss_mask, vocab_size)
        for name in _PER_TOKEN_SIGNALS:
            value = getattr(self, name)
            if value is not None:
                require_shape(name, value, shape, "S")
                require_finite(name, value, where=self.loss_mask)
        indices, logp = self.teacher_topk_indices, self.teacher_topk_logp
        if (indices is None) != (logp is None):
            raise ValueError("teacher_topk_indices and teacher_topk_logp must be given together")
        if indices is not None:
            if indices.dim() != len(shape) + 1 or tuple(indices.shape[:-1]) != shape:
                raise ValueError(f"teacher_topk_indices must have shape [*S, K] with S={shape}, "
                                 f"got {tuple(indices.shape)}")
            require_shape("teacher_topk_logp", logp, tuple(indices.shape), "[*S, K]")
            require_finite("teacher_topk_logp", logp, where=self.loss_mask[..., None])
            _require_token_ids("teacher_topk_indices", indices, self.loss_mask[..., None], vocab_size)

    def flatten(self) -> TokenBatch:
        """The same batch with ``S`` flattened to ``[N]``; masked token ids are set to 0 so
        that padding values such as -100 can be gathered safely."""
        flat = {f.name: _flatten(getattr(self, f.name), self.loss_mask.dim()) for f in fields(self)}
        mask = flat["loss_mask"]
        flat["targets"] = torch.where(mask, flat["targets"], 0)
        if flat["teacher_topk_indices"] is not None:
            flat["teacher_topk_indices"] = torch.where(mask[:, None], flat["teacher_topk_indices"], 0)
        return TokenBatch(**flat)

    def token_slice(self, start: int, stop: int) -> TokenBatch:
        """Tokens ``[start, stop)`` of a flattened batch."""
        return replace(self, **{f.name: None if getattr(self, f.name) is None
                                else getattr(self, f.name)[start:stop] for f in fields(self)})

    def token_select(self, index: Tensor) -> TokenBatch:
        """Tokens ``index`` (int64 ``[M]``) of a flattened batch, in that order."""
        return replace(self, **{f.name: None if getattr(self, f.name) is None
                                else getattr(self, f.name).index_select(0, index)
                                for f in fields(self)})


@dataclass
class StudentTerms:
    """Differentiable per-token functions of the student's logits (all ``[N]`` unless noted).

    Attributes:
        logp: log-prob of the target token.
        entropy: entropy of the student's next-token distribution (nats).
        teacher_kl: exact full-vocabulary KL between student and teacher, in the direction
            the objective asks for; ``None`` without teacher logits.
        topk_logp: ``[N, K]`` student log-probs at the teacher's top-k ids, or ``None``.
        teacher_logp: teacher log-prob of the target (constant), or ``None`` without
            teacher logits.
    """

    logp: Tensor
    entropy: Tensor
    teacher_kl: Tensor | None = None
    topk_logp: Tensor | None = None
    teacher_logp: Tensor | None = None


def _flatten(value: Tensor | None, token_dims: int) -> Tensor | None:
    if value is None:
        return None
    return value.reshape(-1, *value.shape[token_dims:])


def _require_token_ids(name: str, ids: Tensor, where: Tensor, vocab_size: int) -> None:
    if ids.dtype != torch.int64:
        raise ValueError(f"{name} must be int64 token ids, got {ids.dtype}")
    used = ids[where.expand_as(ids)]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= vocab_size):
        raise ValueError(f"{name} has ids outside [0, {vocab_size}) on loss tokens")
