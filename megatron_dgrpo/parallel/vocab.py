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
from torch import Tensor

from megatron_dgrpo.algorithms.inputs import StudentTerms
from megatron_dgrpo.parallel.collectives import all_gather_tensors, all_reduce, group_rank_and_size

KL_DIRECTIONS = ("reverse", "forward")

# Logit given to the rows Megatron adds to pad the vocabulary for TP (up to a multiple of
# 128 x TP): far below any real logit, so they carry no probability, yet finite, so that
# 0 * logit stays 0 in entropy and KL sums. Every path that forms logits masks them so.
PADDED_VOCAB_LOGIT = -1.0e4
DEFAULT_CHUNK_ELEMENTS = 2 ** 25  # 128 MiB of fp32 logits per chunk (no-grad scoring)
# The fused loss's chunks may be twice as large: it keeps two (student and teacher logits)
# and larger row counts keep its output-layer GEMMs efficient (fused_chunk_tokens).
FUSED_CHUNK_ELEMENTS = 2 ** 26
# On the CPU the fused loss's per-token terms run over blocks of a chunk's rows of this many
# logits (16 MiB fp32), so that probabilities and other temporaries exist for one block at a
# time (on a GPU a block is the whole chunk: parallel/fused.py).
ROW_BLOCK_ELEMENTS = 2 ** 22


def first_padded_column(vocab_size: int | None, local_vocab: int, tp_rank: int) -> int:
    """Index in this rank's ``[*, V_local]`` shard of the first padding column (ids at and
    past ``vocab_size``); ``local_vocab`` when the shard has none or ``vocab_size`` is None."""
    if vocab_size is None:
        return local_vocab
    return min(local_vocab, max(0, vocab_size - tp_rank * local_vocab))


def mask_padded_vocab(logits: Tensor, vocab_size: int, tp_rank: int) -> Tensor:
    """Logits ``[..., V_local]`` of TP rank ``tp_rank`` with the padding columns set to
    :data:`PADDED_VOCAB_LOGIT` (out of place, autograd-safe)."""
    padded_from = first_padded_column(vocab_size, logits.shape[-1], tp_rank)
    if padded_from == logits.shape[-1]:
        return logits
    ids = torch.arange(logits.shape[-1], device=logits.device)
    return logits.masked_fill(ids >= padded_from, PADDED_VOCAB_LOGIT)


def drop_padded_vocab(full_logits: Tensor, vocab_size: int) -> Tensor:
    """Gathered ``[..., V_padded]`` logits (all TP shards) without the padding columns:
    ``[..., vocab_size]`` (for sampling, where only real tokens may be drawn)."""
    return full_logits[..., :vocab_size]


def default_chunk_tokens(local_vocab: int) -> int:
    """Tokens per chunk so that one chunk of logits holds ~``DEFAULT_CHUNK_ELEMENTS``."""
    return max(16, DEFAULT_CHUNK_ELEMENTS // local_vocab)


def fused_chunk_tokens(local_vocab: int, hidden_size: int) -> int:
    """The fused loss's default chunk: ``FUSED_CHUNK_ELEMENTS`` logits, and at most
    ``hidden_size // 3`` tokens, so that a chunk of logits ``[chunk, V_local]`` is at most
    about a third of the output-weight gradient ``[V_local, H]`` the loss holds anyway (it
    keeps two chunks: student and teacher logits); never less than one block of
    ``ROW_BLOCK_ELEMENTS`` logits (for small models, where all of it is small)."""
    return max(16, min(FUSED_CHUNK_ELEMENTS // local_vocab,
                       max(hidden_size // 3, ROW_BLOCK_ELEMENTS // local_vocab)))


@dataclass
class SavedForBackward:
    """What the backward needs: the logits (not copied) and per-token scalars ``[N]``."""

    student_logits: Tensor
    teacher_logits: Tensor | None
    student_lse: Tensor
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


def _shifted_exp(logits: Tensor, global_max: Tensor, group,
                 out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``exp(z - max)`` ``[N, V_local]`` (unnormalised probabilities: one pass fewer; in
    ``out`` when given), its full-vocabulary row sum ``[N]`` and the log-sum-exp ``[N]``."""
    shifted = torch.sub(logits, global_max[:, None], out=out).exp_()
    total = all_reduce(shifted.sum(dim=1), "sum", group)
    return shifted, total, global_max + total.log()


def terms_forward(student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor,
                  topk_indices: Tensor | None, kl_direction: str, group=None,
                  scratch: Tensor | None = None,
                  ) -> tuple[StudentTerms, SavedForBackward]:
    """Per-token terms (no autograd) of one vocabulary shard's logits.

    Args:
        student_logits: ``[N, V_local]`` float.
        teacher_logits: ``[N, V_local]`` same dtype, or ``None``.
        targets: ``[N]`` int64 global token ids (all valid; mask padding beforehand).
        topk_indices: ``[N, K]`` int64 global ids (teacher top-k) or ``None``.
        kl_direction: ``reverse`` (KL(student || teacher)) or ``forward`` (KL(teacher || student)).
        group: the TP process group; ``None`` = unsharded vocabulary.
        scratch: an ``[N, V_local]`` buffer the probabilities are computed in (no
            allocation; its contents are overwritten), or ``None``.

    Returns:
        ``(terms, saved)``: the terms (``[N]`` / ``[N, K]``) and what
        :func:`terms_backward` needs.
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
    maxima = all_reduce(torch.stack(maxima), "max", group)
    target_slot, target_is_local = _local_slots(targets, start, local_vocab)

    # Teacher first, so its probabilities are freed before the student's are allocated:
    # at most three [N, V_local] buffers live at once (both logits and one probability,
    # in `scratch` when given).
    teacher_lse, teacher_sums = None, []
    if has_teacher:
        teacher_exp, teacher_total, teacher_lse = _shifted_exp(teacher_logits, maxima[1], group,
                                                               scratch)
        if not bool(torch.isfinite(teacher_lse).all()):
            raise ValueError("teacher logits contain non-finite values (NaN or inf)")
        teacher_sums.append(torch.where(target_is_local,
                                        teacher_logits.gather(1, target_slot[:, None])[:, 0], 0.0))
        if kl_direction == "forward":
            teacher_sums += [_row_dot(teacher_exp, teacher_logits) / teacher_total,
                             _row_dot(teacher_exp, student_logits) / teacher_total]
        del teacher_exp
    student_exp, student_total, student_lse = _shifted_exp(student_logits, maxima[0], group,
                                                           scratch)
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
    stacked = all_reduce(stacked, "sum", group)

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
    saved = SavedForBackward(student_logits, teacher_logits, student_lse, teacher_lse,
                             entropy, kl, kl_direction, target_slot, target_is_local, topk_slot,
                             topk_is_local)
    return terms, saved


def terms_backward(saved: SavedForBackward, grad_logp: Tensor | None, grad_entropy: Tensor | None,
                   grad_kl: Tensor | None, grad_topk: Tensor | None,
                   overwrite_logits: bool = False, scratch: Tensor | None = None) -> Tensor:
    """Gradient ``[N, V_local]`` w.r.t. this shard's student logits.

    The ``grad_*`` are the (TP-replicated) gradients of the loss w.r.t. the terms
    (``[N]``, ``[N, K]`` for top-k; ``None`` = 0). With ``overwrite_logits`` the gradient
    is built in the saved student logits' storage (no new buffer). The probabilities are
    recomputed from the logits, in ``scratch`` (``[N, V_local]``) when given.
    """
    logits = saved.student_logits
    zeros = torch.zeros_like(saved.student_lse)
    g_logp = zeros if grad_logp is None else grad_logp
    g_entropy = zeros if grad_entropy is None else grad_entropy
    g_kl = zeros if grad_kl is None or saved.kl is None else grad_kl
    reverse = saved.kl is not None and saved.kl_direction == "reverse"
    forward = saved.kl is not None and saved.kl_direction == "forward"
    # probabilities, computed before the logits may be overwritten
    probs = torch.sub(logits, saved.student_lse[:, None], out=scratch).exp_()

    # grad = p * [z * a - g_kl_rev * z_teacher + c] - g_kl_fwd * q + one-hots, with
    # log p = z - lse folded into a (per-row slope of z) and c (per-row constant).
    slope = (g_kl if reverse else zeros) - g_entropy
    constant = -g_entropy * saved.entropy - g_logp - slope * saved.student_lse
    if grad_topk is not None:
        constant = constant - grad_topk.sum(dim=1)
    if reverse:
        constant = constant + g_kl * (saved.teacher_lse - saved.kl)
    if forward:
        constant = constant + g_kl
    slope_column = slope[:, None]
    grad = logits.mul_(slope_column) if overwrite_logits else logits * slope_column
    if reverse:
        grad.addcmul_(saved.teacher_logits, g_kl[:, None], value=-1.0)
    grad.add_(constant[:, None]).mul_(probs)
    del probs
    if forward:
        teacher_probs = torch.sub(saved.teacher_logits, saved.teacher_lse[:, None],
                                  out=scratch).exp_()
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
        terms, saved = terms_forward(student_logits.detach(),
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


@torch.no_grad()
def target_logp(hidden: Tensor, weight: Tensor, targets: Tensor, vocab_size: int,
                tp_group=None, chunk_tokens: int | None = None,
                temperature: float = 1.0) -> Tensor:
    """``log_softmax(hidden @ weight.T / temperature)[target]`` per token, chunk by chunk:
    never more than ``chunk_tokens x V_local`` logits at once and no gather of the
    vocabulary. The one function that turns final hidden states into target log-probs
    (trainer scoring passes, refit verification, the teacher cache's target column).

    Args:
        hidden: ``[*S, H]`` final hidden states (replicated over TP).
        weight: ``[V_local, H]`` this TP rank's output-layer shard (padded vocabulary).
        targets: int64 ``S`` global token ids.
        vocab_size: real vocabulary size; ids at and past it are TP padding (masked).
        tp_group: the vocabulary's TP group (``None``: unsharded).
        chunk_tokens: tokens per chunk (default :func:`default_chunk_tokens`).
        temperature: logits are divided by it (the sampling temperature; 1 = unscaled).

    Returns:
        ``S`` float32 log-probs (reduced in float32 at least), identical on every TP rank.
    """
    local_vocab = weight.shape[0]
    padded_from = first_padded_column(vocab_size, local_vocab, group_rank_and_size(tp_group)[0])
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    step = chunk_tokens or default_chunk_tokens(local_vocab)
    compute = torch.promote_types(weight.dtype, torch.float32)
    pieces = []
    for start in range(0, flat_hidden.shape[0], step):
        logits = (flat_hidden[start:start + step] @ weight.T).to(compute)
        if temperature != 1.0:
            logits /= temperature
        logits[:, padded_from:] = PADDED_VOCAB_LOGIT
        pieces.append(vocab_parallel_terms(logits, None, flat_targets[start:start + step],
                                           group=tp_group).logp)
    if not pieces:
        return torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    return torch.cat(pieces).reshape(targets.shape).float()


@torch.no_grad()
def vocab_parallel_topk(logits: Tensor, k: int, vocab_size: int,
                        tp_group=None) -> tuple[Tensor, Tensor]:
    """Top-k of the full-vocabulary log-softmax of TP-sharded logits, without gathering them.

    Args:
        logits: ``[N, V_local]`` this TP rank's shard (ids ``[r * V_local, (r+1) * V_local)``).
        k: tokens to keep per row; vocab_size: real vocabulary (padding columns are masked
            with :data:`PADDED_VOCAB_LOGIT`, so they are never chosen while ``k`` is at most
            the real vocabulary).

    Returns:
        ``(indices int64 [N, k], logp float32 [N, k])``, best first, identical on all ranks.
    """
    tp_rank, tp_size = group_rank_and_size(tp_group)
    local = mask_padded_vocab(logits.float(), vocab_size, tp_rank)
    terms = _lse(local, tp_group)
    values, slots = local.topk(min(k, local.shape[-1]), dim=-1)
    global_ids = slots + tp_rank * local.shape[-1]
    if tp_size > 1:
        values = torch.cat(all_gather_tensors(values, tp_group), dim=-1)
        global_ids = torch.cat(all_gather_tensors(global_ids, tp_group), dim=-1)
    best, order = values.topk(k, dim=-1)
    return global_ids.gather(-1, order), best - terms[:, None]


def _lse(logits: Tensor, group) -> Tensor:
    """``[N]`` log-sum-exp over the full (sharded) vocabulary of ``[N, V_local]`` logits."""
    row_max = all_reduce(logits.max(dim=-1).values, "max", group)
    _, _, lse = _shifted_exp(logits, row_max, group)
    return lse
