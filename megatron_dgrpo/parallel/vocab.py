"""Per-token terms of logits sharded over the vocabulary across tensor-parallel ranks.

Rank ``r`` of the TP group holds logits ``[N, V_local]`` for vocabulary ids
``[r * V_local, (r + 1) * V_local)`` (Megatron's equal, padded shards). Everything is
computed from all-reduces of per-token scalars (max, sum of exp, dot products, gathered
logits): the full vocabulary is never gathered. Forward cost: three all-reduces of
``[*, N]`` tensors per call (four with teacher logits).

Gradients: the outputs are identical on every TP rank and so are their incoming gradients;
the gradient of each output w.r.t. the local shard is a local expression
(``d logp_y / dz_v = 1[v = y] - p_v``, ``dH / dz_v = -p_v (log p_v + H)``,
``dKL(p||q) / dz_v = p_v (log p_v - log q_v - KL)``, ``dKL(q||p) / dz_v = p_v - q_v``), so the
backward needs no communication. Teacher logits are treated as constants (frozen teacher).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_dgrpo.algorithms.inputs import StudentTerms

KL_DIRECTIONS = ("reverse", "forward")


def group_rank_and_size(group) -> tuple[int, int]:
    """``(rank, world size)`` in ``group``; ``(0, 1)`` for ``group=None`` (no parallelism)."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce(tensor: Tensor, op, group) -> Tensor:
    """In-place all-reduce over ``group``; a no-op for ``group=None``."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


@dataclass
class SavedForBackward:
    """What the backward needs: the logits (not copied) and per-token scalars ``[N]``."""

    student_logits: Tensor
    teacher_logits: Tensor | None
    student_lse: Tensor
    student_exp_total: Tensor
    teacher_lse: Tensor | None
    entropy: Tensor
    kl: Tensor | None
    kl_direction: str
    target_slot: Tensor
    target_is_local: Tensor
    topk_slot: Tensor | None
    topk_is_local: Tensor | None


def _local_slots(ids: Tensor, start: int, size: int) -> tuple[Tensor, Tensor]:
    """Column of each global id in this shard (0 when elsewhere) and whether it is here."""
    is_local = (ids >= start) & (ids < start + size)
    return torch.where(is_local, ids - start, 0), is_local


def _row_dot(left: Tensor, right: Tensor) -> Tensor:
    """``[N, V] x [N, V] -> [N]`` row-wise dot product without an ``[N, V]`` temporary."""
    return torch.bmm(left.unsqueeze(1), right.unsqueeze(2)).reshape(-1)


def _shifted_exp(logits: Tensor, global_max: Tensor, group) -> tuple[Tensor, Tensor, Tensor]:
    """``exp(z - max)`` ``[N, V_local]`` (unnormalised probabilities: one pass fewer), its
    full-vocabulary row sum ``[N]`` and the log-sum-exp ``[N]``."""
    shifted = (logits - global_max[:, None]).exp_()
    total = all_reduce(shifted.sum(dim=1), dist.ReduceOp.SUM, group)
    return shifted, total, global_max + total.log()


def terms_forward(student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor,
                  topk_indices: Tensor | None, kl_direction: str, group=None,
                  ) -> tuple[StudentTerms, SavedForBackward, Tensor]:
    """Per-token terms (no autograd) of one vocabulary shard's logits.

    Args:
        student_logits: ``[N, V_local]`` float.
        teacher_logits: ``[N, V_local]`` same dtype, or ``None``.
        targets: ``[N]`` int64 global token ids (all valid; mask padding beforehand).
        topk_indices: ``[N, K]`` int64 global ids (teacher top-k) or ``None``.
        kl_direction: ``reverse`` (KL(student || teacher)) or ``forward`` (KL(teacher || student)).
        group: the TP process group; ``None`` = unsharded vocabulary.

    Returns:
        ``(terms, saved, student_exp)``: the terms (``[N]`` / ``[N, K]``), what
        :func:`terms_backward` needs, and the student's unnormalised probabilities
        ``exp(z - max)`` ``[N, V_local]`` (pass them back to the backward to skip
        recomputing them, or drop them).
    """
    if kl_direction not in KL_DIRECTIONS:
        raise ValueError(f"unknown kl_direction {kl_direction!r}; choose one of {KL_DIRECTIONS}")
    rank, _ = group_rank_and_size(group)
    local_vocab = student_logits.shape[1]
    start = rank * local_vocab
    has_teacher = teacher_logits is not None

    maxima = [student_logits.max(dim=1).values]
    if has_teacher:
        maxima.append(teacher_logits.max(dim=1).values)
    maxima = all_reduce(torch.stack(maxima), dist.ReduceOp.MAX, group)
    target_slot, target_is_local = _local_slots(targets, start, local_vocab)

    # Teacher first, so its probabilities are freed before the student's are allocated:
    # at most three [N, V_local] buffers live at once (both logits and one probability).
    teacher_lse, teacher_sums = None, []
    if has_teacher:
        teacher_exp, teacher_total, teacher_lse = _shifted_exp(teacher_logits, maxima[1], group)
        if not bool(torch.isfinite(teacher_lse).all()):
            raise ValueError("teacher logits contain non-finite values (NaN or inf)")
        teacher_sums.append(torch.where(target_is_local,
                                        teacher_logits.gather(1, target_slot[:, None])[:, 0], 0.0))
        if kl_direction == "forward":
            teacher_sums += [_row_dot(teacher_exp, teacher_logits) / teacher_total,
                             _row_dot(teacher_exp, student_logits) / teacher_total]
        del teacher_exp
    student_exp, student_total, student_lse = _shifted_exp(student_logits, maxima[0], group)
    if not bool(torch.isfinite(student_lse).all()):
        raise ValueError("student logits contain non-finite values (NaN or inf)")

    sums = [_row_dot(student_exp, student_logits) / student_total,
            torch.where(target_is_local, student_logits.gather(1, target_slot[:, None])[:, 0], 0.0),
            *teacher_sums]
    if has_teacher and kl_direction == "reverse":
        sums.append(_row_dot(student_exp, teacher_logits) / student_total)
    topk_slot = topk_is_local = None
    num_sums = len(sums)
    stacked = torch.stack(sums)
    if topk_indices is not None:
        topk_slot, topk_is_local = _local_slots(topk_indices, start, local_vocab)
        topk_logits = torch.where(topk_is_local, student_logits.gather(1, topk_slot), 0.0)
        stacked = torch.cat([stacked, topk_logits.T])
    stacked = all_reduce(stacked, dist.ReduceOp.SUM, group)

    student_dot_logits, target_logit = stacked[0], stacked[1]
    entropy = student_lse - student_dot_logits
    kl = teacher_logp = None
    if has_teacher:
        teacher_logp = stacked[2] - teacher_lse
        if kl_direction == "reverse":
            kl = (student_dot_logits - stacked[3]) - student_lse + teacher_lse
        else:
            kl = (stacked[3] - stacked[4]) - teacher_lse + student_lse
    topk_logp = None if topk_indices is None else stacked[num_sums:].T - student_lse[:, None]
    terms = StudentTerms(logp=target_logit - student_lse, entropy=entropy, teacher_kl=kl,
                         topk_logp=topk_logp, teacher_logp=teacher_logp)
    saved = SavedForBackward(student_logits, teacher_logits, student_lse, student_total, teacher_lse,
                             entropy, kl, kl_direction, target_slot, target_is_local, topk_slot,
                             topk_is_local)
    return terms, saved, student_exp


def terms_backward(saved: SavedForBackward, grad_logp: Tensor | None, grad_entropy: Tensor | None,
                   grad_kl: Tensor | None, grad_topk: Tensor | None,
                   student_exp: Tensor | None = None, overwrite_logits: bool = False) -> Tensor:
    """Gradient ``[N, V_local]`` w.r.t. this shard's student logits.

    The ``grad_*`` are the (TP-replicated) gradients of the loss w.r.t. the terms
    (``[N]``, ``[N, K]`` for top-k; ``None`` = 0). ``student_exp`` from
    :func:`terms_forward`, if given, is reused and overwritten. With ``overwrite_logits``
    the gradient is built in the saved student logits' storage (no new buffer).
    """
    logits = saved.student_logits
    zeros = torch.zeros_like(saved.student_lse)
    g_logp = zeros if grad_logp is None else grad_logp
    g_entropy = zeros if grad_entropy is None else grad_entropy
    g_kl = zeros if grad_kl is None or saved.kl is None else grad_kl
    reverse = saved.kl is not None and saved.kl_direction == "reverse"
    forward = saved.kl is not None and saved.kl_direction == "forward"
    if student_exp is None:  # normalised probabilities, computed before logits may be overwritten
        student_exp, row_scale = (logits - saved.student_lse[:, None]).exp_(), 1.0
    else:
        row_scale = 1.0 / saved.student_exp_total

    # grad = p * [z * a - g_kl_rev * z_teacher + c] - g_kl_fwd * q + one-hots, with
    # log p = z - lse folded into a (per-row slope of z) and c (per-row constant); p =
    # student_exp * row_scale, the scale folded into the per-row coefficients.
    slope = (g_kl if reverse else zeros) - g_entropy
    constant = -g_entropy * saved.entropy - g_logp - slope * saved.student_lse
    if grad_topk is not None:
        constant = constant - grad_topk.sum(dim=1)
    if reverse:
        constant = constant + g_kl * (saved.teacher_lse - saved.kl)
    if forward:
        constant = constant + g_kl
    slope_column = (slope * row_scale)[:, None]
    grad = logits.mul_(slope_column) if overwrite_logits else logits * slope_column
    if reverse:
        grad.addcmul_(saved.teacher_logits, (g_kl * row_scale)[:, None], value=-1.0)
    grad.add_((constant * row_scale)[:, None]).mul_(student_exp)
    del student_exp
    if forward:
        teacher_probs = (saved.teacher_logits - saved.teacher_lse[:, None]).exp_()
        grad.addcmul_(teacher_probs, g_kl[:, None], value=-1.0)
        del teacher_probs
    grad.scatter_add_(1, saved.target_slot[:, None],
                      torch.where(saved.target_is_local, g_logp, 0.0)[:, None])
    if grad_topk is not None:
        grad.scatter_add_(1, saved.topk_slot, torch.where(saved.topk_is_local, grad_topk, 0.0))
    return grad


class _VocabParallelTerms(torch.autograd.Function):
    """Autograd wrapper: differentiable w.r.t. the student logits only."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, targets, topk_indices, kl_direction, group):
        terms, saved, _ = terms_forward(student_logits.detach(),
                                        None if teacher_logits is None else teacher_logits.detach(),
                                        targets, topk_indices, kl_direction, group)
        ctx.saved = saved
        empty = student_logits.new_empty(0)
        teacher_logp = empty if terms.teacher_logp is None else terms.teacher_logp
        ctx.mark_non_differentiable(teacher_logp)
        return (terms.logp, terms.entropy,
                empty if terms.teacher_kl is None else terms.teacher_kl,
                empty if terms.topk_logp is None else terms.topk_logp,
                teacher_logp)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, grad_kl, grad_topk, _grad_teacher_logp):
        saved = ctx.saved
        grad_topk = grad_topk if saved.topk_slot is not None else None
        grad = terms_backward(saved, grad_logp, grad_entropy, grad_kl, grad_topk)
        return grad, None, None, None, None, None


def vocab_parallel_terms(student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor,
                         topk_indices: Tensor | None = None, kl_direction: str = "reverse",
                         group=None) -> StudentTerms:
    """Differentiable :class:`StudentTerms` of sharded logits; see :func:`terms_forward`."""
    logp, entropy, kl, topk_logp, teacher_logp = _VocabParallelTerms.apply(
        student_logits, teacher_logits, targets, topk_indices, kl_direction, group)
    return StudentTerms(logp=logp, entropy=entropy,
                        teacher_kl=kl if teacher_logits is not None else None,
                        topk_logp=topk_logp if topk_indices is not None else None,
                        teacher_logp=teacher_logp if teacher_logits is not None else None)
