"""An independent float64 re-implementation of every objective, written plainly from the
definitions in shared/reference/method.md, from *full* (unsharded) logits. Tests compare
the package against it; it shares no code with megatron_dgrpo besides reading LossConfig's
fields and TokenBatch's tensors.
"""

from __future__ import annotations

import torch

DEFAULT_ESTIMATOR = {"kd": "full", "grpo": "k2", "opd": "full", "dgrpo": "full"}


def plain_sampled_kl(logp, logq, estimator):
    if estimator == "k1":
        return logp - logq
    if estimator == "k2":
        return (logp - logq) ** 2 / 2
    ratio = torch.exp(logq - logp)
    return ratio - (logq - logp) - 1


def plain_topk_kl(logp_k, logq_k, tail):
    """KL(P || Q) over K categories (+ tail bucket) from full-vocab log-probs at K ids."""
    p, q = logp_k.exp(), logq_k.exp()
    if tail == "renormalize":
        p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
        return (p * (p.log() - q.log())).sum(-1)
    p_tail = (1 - p.sum(-1)).clamp(min=torch.finfo(p.dtype).tiny)
    q_tail = (1 - q.sum(-1)).clamp(min=torch.finfo(q.dtype).tiny)
    return (p * (p.log() - q.log())).sum(-1) + p_tail * (p_tail.log() - q_tail.log())


def plain_surrogate_loss(cfg, logp, old, adv, rollout):
    """-IS * min(r A, clip(r) A) [dual clipped], per token."""
    ratio = torch.exp(logp - old)
    clipped_ratio = torch.clamp(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high)
    objective = torch.minimum(ratio * adv, clipped_ratio * adv)
    if cfg.dual_clip is not None:
        objective = torch.where(adv < 0, torch.maximum(objective, cfg.dual_clip * adv), objective)
    loss = -objective
    if rollout is not None and cfg.tis_cap is not None:
        loss = loss * torch.clamp(torch.exp(old - rollout), max=cfg.tis_cap)
    return loss


def plain_token_losses(cfg, student_logits, teacher_logits, batch):
    """Per-token loss [*S] in float64 (differentiable w.r.t. student_logits)."""
    z = student_logits.double()
    log_p = torch.log_softmax(z, dim=-1)
    targets = torch.where(batch.loss_mask, batch.targets, 0)
    logp = log_p.gather(-1, targets[..., None])[..., 0]
    own = logp.detach()
    mask = batch.loss_mask

    def on_mask(value, fill):
        return None if value is None else torch.where(mask, value.double(), fill)

    old = on_mask(batch.old_logp, own)
    old = own if old is None else old
    rollout = on_mask(batch.rollout_logp, own)
    ref = on_mask(batch.ref_logp, own)
    adv = on_mask(batch.advantages, torch.zeros_like(own))
    teacher_logp = on_mask(batch.teacher_logp, own)
    log_q = None
    if teacher_logits is not None:
        log_q = torch.log_softmax(teacher_logits.double(), dim=-1)
        teacher_logp = log_q.gather(-1, targets[..., None])[..., 0]
    estimator = cfg.kl_estimator or DEFAULT_ESTIMATOR.get(cfg.objective)

    def teacher_kl(direction):
        if estimator == "full":
            if direction == "reverse":
                return (log_p.exp() * (log_p - log_q)).sum(-1)
            return (log_q.exp() * (log_q - log_p)).sum(-1)
        if estimator == "topk":
            idx = torch.where(mask[..., None], batch.teacher_topk_indices, 0)
            student_k = log_p.gather(-1, idx)
            teacher_k = torch.where(mask[..., None], batch.teacher_topk_logp.double(), student_k.detach())
            if direction == "reverse":
                return plain_topk_kl(student_k, teacher_k, cfg.topk_tail)
            return plain_topk_kl(teacher_k, student_k, cfg.topk_tail)
        return plain_sampled_kl(logp, teacher_logp, estimator)

    if cfg.objective == "sft":
        loss = -logp
    elif cfg.objective == "kd":
        loss = teacher_kl("forward")
    elif cfg.objective == "grpo":
        loss = plain_surrogate_loss(cfg, logp, old, adv, rollout)
        if cfg.kl_coef > 0:
            loss = loss + cfg.kl_coef * plain_sampled_kl(logp, ref, estimator)
    elif cfg.objective == "opd":
        if cfg.form == "advantage":
            loss = plain_surrogate_loss(cfg, logp, old, -(old - teacher_logp), rollout)
        else:
            loss = teacher_kl("reverse")
    elif cfg.objective == "dgrpo":
        if cfg.form == "advantage":
            shaped = adv - cfg.kl_coef * (old - teacher_logp)
            loss = plain_surrogate_loss(cfg, logp, old, shaped, rollout)
        else:
            loss = plain_surrogate_loss(cfg, logp, old, adv, rollout) + cfg.kl_coef * teacher_kl("reverse")
        if cfg.ref_kl_coef > 0:
            loss = loss + cfg.ref_kl_coef * plain_sampled_kl(logp, ref, cfg.ref_kl_estimator)
    else:
        raise AssertionError(cfg.objective)
    return loss


def plain_weights(loss_mask, aggregation, length_norm=None):
    """Global aggregation weights [B, T] from the full batch's mask."""
    mask = loss_mask.double()
    if aggregation == "token_mean":
        total = mask.sum()
        return mask / total if total > 0 else torch.zeros_like(mask)
    if aggregation == "constant_length":  # Dr. GRPO: every row over the same constant
        return mask / (mask.shape[0] * length_norm)
    per_row = mask.sum(1, keepdim=True)
    sequences = (per_row > 0).sum()
    weights = torch.zeros_like(mask)
    rows = per_row[:, 0] > 0
    weights[rows] = mask[rows] / (per_row[rows] * sequences)
    return weights


def plain_loss(cfg, student_logits, teacher_logits, batch):
    """Scalar loss = sum over loss tokens of weight * per-token loss."""
    token_losses = plain_token_losses(cfg, student_logits, teacher_logits, batch)
    weights = plain_weights(batch.loss_mask, cfg.aggregation, cfg.length_norm)
    return torch.where(batch.loss_mask, weights * token_losses, 0.0).sum()
