"""Fused output layer + loss for long sequences: hidden states in, loss out, chunk by chunk.

``[tokens, vocab]`` logits are the memory wall of long-context training (128K tokens x 152K
vocabulary in fp32 is 78 GB per model). Only the ``M`` tokens inside the loss mask are
projected at all (the rest add exactly 0; in RL the prompt is most of the sequence), and they
are processed in chunks of ``chunk_tokens``: for each chunk the student (and teacher) logits are computed, reduced to
per-token terms (:mod:`megatron_dgrpo.parallel.vocab`), the objective is evaluated, and the
chunk's gradients w.r.t. hidden states and the output weight are accumulated at once, then
the chunk's logits are freed. The forward pass thus does the whole backward work of the
output layer (one logits matmul and two gradient matmuls per chunk, no recomputation); the
custom backward only scales the accumulated gradients by the incoming gradient.

Logits are reduced in float32 when the models are bf16 (and in float64 for float64 inputs).
Peak memory beyond the inputs: the output-weight gradient ``[V_local, H]`` (float32), the
hidden-state gradient ``[M, H]``, two chunk-sized ``[chunk_tokens, V_local]`` buffers
(student logits, which become the logits' gradient in place, and teacher logits) and one
block of probabilities: the per-token terms and the logits' gradient are computed over
blocks of a chunk's rows (on the CPU ``ROW_BLOCK_ELEMENTS`` logits each, :mod:`.vocab`; on
a GPU the block is the whole chunk), always in the same scratch buffer. The default chunk
(:func:`~.vocab.fused_chunk_tokens`) holds ``FUSED_CHUNK_ELEMENTS`` logits per model, and at
most about a third of the weight gradient.
When every token is a loss token the hidden states are used in place (no ``[M, H]``
copies).

FP8 (``fp8=Fp8LossConfig(...)``, :mod:`megatron_dgrpo.parallel.fp8`): the three GEMMs take
FP8 operands (E4M3 hidden states and weights, E5M2 or E4M3 logits' gradient, per-tensor or
row-wise current scaling) and return float32; everything after them is unchanged. It adds
``2 * V_local * H`` bytes (the weight in FP8, row- and column-major) to the peak.

Composition: TP: the weights are vocabulary shards ``[V_local, H]``, hidden states are
replicated over TP, and the returned hidden-state gradient is all-reduced over the TP group
(the same contract as Megatron's column-parallel output layer). CP / DP / microbatches:
each rank passes its own tokens with global aggregation weights; nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from megatron_dgrpo.algorithms.inputs import StudentTerms, TokenBatch
from megatron_dgrpo.algorithms.metrics import LossMetrics
from megatron_dgrpo.algorithms.objectives import LossConfig, evaluate, get_objective
from megatron_dgrpo.parallel.collectives import all_reduce, group_rank_and_size
from megatron_dgrpo.parallel.fp8 import (
    Fp8LossConfig,
    Fp8OutputLayer,
    check_fp8_shapes,
    fp8_unsupported_reason,
)
from megatron_dgrpo.parallel.materialized import check_logits_shapes, check_temperature
from megatron_dgrpo.parallel.vocab import (
    PADDED_VOCAB_LOGIT,
    ROW_BLOCK_ELEMENTS,
    first_padded_column,
    fused_chunk_tokens,
    terms_backward,
    terms_forward,
)


@dataclass
class _ChunkedRun:
    """Everything but the two differentiable inputs, and the metrics the forward collects."""

    config: LossConfig
    batch: TokenBatch
    teacher_hidden: Tensor | None
    teacher_weight: Tensor | None
    kl_direction: str
    tp_group: object
    chunk_tokens: int
    padded_from: int
    temperature: float = 1.0
    fp8: Fp8LossConfig | None = None
    metrics: LossMetrics | None = None

    def output_layer(self, weight: Tensor, teacher: bool, want_grads: bool, compute: torch.dtype):
        """The GEMMs of the student's (or the teacher's) output layer for this call."""
        if self.fp8 is None or (teacher and not self.fp8.teacher):
            return _OutputLayer(weight, compute)
        return Fp8OutputLayer(weight, self.fp8, self.padded_from, self.tp_group, want_grads,
                              self.chunk_tokens)


class _OutputLayer:
    """The output layer's GEMMs in the weight's dtype, logits and weight gradient in
    ``compute`` (the interface of :class:`~megatron_dgrpo.parallel.fp8.Fp8OutputLayer`)."""

    def __init__(self, weight: Tensor, compute: torch.dtype):
        self.weight, self.compute = weight, compute

    def logits(self, hidden: Tensor) -> Tensor:
        return (hidden @ self.weight.T).to(self.compute)

    def backward(self, grad_logits: Tensor, hidden: Tensor, grad_hidden: Tensor,
                 grad_weight: Tensor) -> None:
        torch.mm(grad_logits.to(self.weight.dtype), self.weight, out=grad_hidden)
        grad_weight.addmm_(grad_logits.T, hidden.to(self.compute))


def _differentiable(terms: StudentTerms) -> tuple[StudentTerms, list[Tensor]]:
    """Leaf copies of the student-dependent terms, so the objective's gradient w.r.t. them
    can be taken without a graph through the logits."""
    leaves = [t.detach().requires_grad_() if t is not None else None
              for t in (terms.logp, terms.entropy, terms.teacher_kl, terms.topk_logp)]
    return StudentTerms(*leaves, teacher_logp=terms.teacher_logp), leaves


def _chunk_logits(layer, hidden: Tensor, compute: torch.dtype, run: _ChunkedRun) -> Tensor:
    """One chunk's logits ``hidden @ weight.T / T`` through ``layer`` (float or FP8 GEMMs),
    in ``compute`` precision, padding columns masked."""
    logits = layer.logits(hidden).to(compute)
    if run.temperature != 1.0:
        logits /= run.temperature
    logits[:, run.padded_from:] = PADDED_VOCAB_LOGIT
    return logits


def _block_rows(local_vocab: int, chunk_tokens: int, device: torch.device) -> int:
    """Rows per block of a chunk: ~``ROW_BLOCK_ELEMENTS`` logits on the CPU (where a
    block's probabilities stay small and in cache); the whole chunk on a GPU, where every
    block would cost ~20 kernel launches and, under TP, four all-reduces of its own."""
    if device.type == "cuda":
        return chunk_tokens
    return min(chunk_tokens, max(1, ROW_BLOCK_ELEMENTS // local_vocab))


def _row_blocks(rows: int, block_rows: int) -> list[tuple[int, int]]:
    """``[first, last)`` row ranges of a chunk's blocks."""
    return [(first, min(first + block_rows, rows)) for first in range(0, rows, block_rows)]


def _block_terms(logits: Tensor, teacher_logits: Tensor | None, chunk: TokenBatch,
                 blocks: list[tuple[int, int]], run: _ChunkedRun, scratch: Tensor):
    """The chunk's per-token terms, computed block of rows by block of rows (the
    probabilities of one block at a time, in ``scratch``), and each block's saved state."""
    pieces, saved = [], []
    for first, last in blocks:
        topk = chunk.teacher_topk_indices
        terms, block_saved = terms_forward(
            logits[first:last], None if teacher_logits is None else teacher_logits[first:last],
            chunk.targets[first:last], None if topk is None else topk[first:last],
            run.kl_direction, run.tp_group, scratch=scratch[:last - first])
        pieces.append(terms)
        saved.append(block_saved)
    if len(pieces) == 1:
        return pieces[0], saved
    return StudentTerms(*(None if getattr(pieces[0], f.name) is None
                          else torch.cat([getattr(p, f.name) for p in pieces])
                          for f in fields(StudentTerms))), saved


def _block_gradients(saved: list, blocks: list[tuple[int, int]],
                     grad_terms: list[Tensor | None], scratch: Tensor) -> None:
    """Write each block's logits' gradient over its logits (probabilities recomputed from
    them in ``scratch``, one block at a time). A function, so that no view of the chunk's
    buffers outlives it (a lingering view would keep both models' chunk logits alive into
    the next chunk)."""
    for (first, last), block_saved in zip(blocks, saved):
        terms_backward(block_saved, *(None if grad is None else grad[first:last]
                                      for grad in grad_terms), overwrite_logits=True,
                       scratch=scratch[:last - first])


class _FusedLinearLoss(torch.autograd.Function):

    @staticmethod
    def forward(ctx, student_hidden: Tensor, student_weight: Tensor, run: _ChunkedRun) -> Tensor:
        want_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        # Logits of bf16 models are reduced in float32 (a bf16 log-sum-exp over the
        # vocabulary is off by ~1e-2 nats); the weight gradient accumulates in it too.
        compute = torch.promote_types(student_hidden.dtype, torch.float32)
        grad_hidden = torch.zeros_like(student_hidden) if want_grads else None
        grad_weight = torch.zeros_like(student_weight, dtype=compute) if want_grads else None
        total = student_hidden.new_zeros(())
        metrics = LossMetrics()
        student = run.output_layer(student_weight, False, want_grads, compute)
        teacher = (None if run.teacher_hidden is None
                   else run.output_layer(run.teacher_weight, True, False, compute))
        # one block's probabilities at a time, always in this buffer (allocated once: on
        # the CPU, freeing and re-allocating blocks of this size fragments glibc's heap)
        local_vocab = student_weight.shape[0]
        block_rows = _block_rows(local_vocab, min(run.chunk_tokens, student_hidden.shape[0]),
                                 student_hidden.device)
        scratch = student_hidden.new_empty(block_rows, local_vocab, dtype=compute)
        for start in range(0, student_hidden.shape[0], run.chunk_tokens):
            stop = min(start + run.chunk_tokens, student_hidden.shape[0])
            chunk = run.batch.token_slice(start, stop)
            hidden = student_hidden[start:stop]
            logits = _chunk_logits(student, hidden, compute, run)
            teacher_logits = None
            if teacher is not None:
                teacher_logits = _chunk_logits(teacher, run.teacher_hidden[start:stop], compute,
                                               run)
            blocks = _row_blocks(stop - start, block_rows)
            terms, saved = _block_terms(logits, teacher_logits, chunk, blocks, run, scratch)
            del teacher_logits  # the blocks' saved views keep what the backward needs
            if not want_grads:
                del saved, logits
                loss, chunk_metrics = evaluate(run.config, terms, chunk)
            else:
                with torch.enable_grad():
                    leaf_terms, leaves = _differentiable(terms)
                    loss, chunk_metrics = evaluate(run.config, leaf_terms, chunk)
                    used = [leaf for leaf in leaves if leaf is not None]
                    grads = torch.autograd.grad(loss, used, allow_unused=True)
                grads = iter(grads)
                grad_terms = [next(grads) if leaf is not None else None for leaf in leaves]
                _block_gradients(saved, blocks, grad_terms, scratch)
                del saved
                grad_logits = logits  # now holds the gradient
                grad_logits[:, run.padded_from:] = 0.0  # padding logits are constants
                if run.temperature != 1.0:  # d(z / T) / dz
                    grad_logits /= run.temperature
                del logits
                student.backward(grad_logits, hidden, grad_hidden[start:stop], grad_weight)
                del grad_logits
            total = total + loss.detach()
            metrics = metrics.merge(chunk_metrics)
        if want_grads:
            all_reduce(grad_hidden, "sum", run.tp_group)
        run.metrics = metrics
        ctx.grads = (grad_hidden, grad_weight)
        ctx.weight_dtype = student_weight.dtype
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        # Scaled in place and handed over (not copied): a second [V_local, H] weight
        # gradient would double the peak. Hence backward can run only once per forward.
        grad_hidden, grad_weight = ctx.grads
        del ctx.grads
        if grad_hidden is not None:
            grad_hidden.mul_(grad_output)
            grad_weight = grad_weight.mul_(grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None


def loss_token_index(loss_mask: Tensor) -> Tensor:
    """int64 ``[M]``: the flat positions of ``loss_mask``'s loss tokens, the only ones the
    fused loss projects; position 0 alone (masked) when there are none, so that every rank
    reports the same metric names. Selecting them before :func:`loss_from_hidden` (hidden
    states ``[M, H]``, the batch's ``token_select``) gives the same loss."""
    keep = torch.nonzero(loss_mask.reshape(-1)).squeeze(1)
    return keep if keep.numel() else torch.zeros(1, dtype=torch.long, device=keep.device)


def loss_from_hidden(config: LossConfig, batch: TokenBatch, student_hidden: Tensor,
                     student_weight: Tensor, teacher_hidden: Tensor | None = None,
                     teacher_weight: Tensor | None = None, tp_group=None,
                     chunk_tokens: int | None = None, vocab_size: int | None = None,
                     temperature: float = 1.0,
                     fp8: Fp8LossConfig | None = None) -> tuple[Tensor, LossMetrics]:
    """This rank's share of the global loss computed from final hidden states.

    Args:
        config: the objective (validated here).
        batch: per-token signals with global aggregation weights; token shape ``S``.
        student_hidden: ``[*S, H]`` final hidden states (replicated over TP).
        student_weight: ``[V_local, H]`` this TP rank's shard of the output layer.
        teacher_hidden: ``[*S, H_teacher]`` teacher hidden states (constant), or ``None``.
        teacher_weight: ``[V_local, H_teacher]`` teacher output-layer shard (constant).
        tp_group: tensor-parallel group of the vocabulary shards (``None``: unsharded).
        chunk_tokens: tokens per chunk; default
            :func:`~megatron_dgrpo.parallel.vocab.fused_chunk_tokens`.
        vocab_size: the real vocabulary size when the weights carry Megatron's TP padding
            rows: logits of ids at and past it are set to :data:`PADDED_VOCAB_LOGIT` (student
            and teacher) and get no gradient. ``None``: every row is a real token.
        temperature: both models' logits are divided by it before the loss (the trained
            policy is ``softmax(logits / T)``, the distribution rollouts are sampled from).
        fp8: FP8 GEMMs for the output layer (:mod:`megatron_dgrpo.parallel.fp8`; the
            hidden size and ``V_local`` must be multiples of 16); ``None``: the weights' dtype.

    Returns:
        ``(loss, metrics)`` exactly as :func:`megatron_dgrpo.parallel.materialized.loss_from_logits`
        would give for ``logits = hidden @ weight.T`` (with ``fp8``: within FP8's error,
        measured in ``tests/parallel/test_fp8_loss.py``). Gradients reach ``student_hidden``
        (all-reduced over TP) and ``student_weight``.
    """
    config.validate()
    check_temperature(temperature)
    check_logits_shapes(batch, student_hidden, teacher_hidden, "student_hidden", "teacher_hidden")
    if (teacher_hidden is None) != (teacher_weight is None):
        raise ValueError("teacher_hidden and teacher_weight must be given together")
    hidden_size = student_hidden.shape[-1]
    if student_weight.dim() != 2 or student_weight.shape[1] != hidden_size:
        raise ValueError(f"student_weight must be [V_local, H={hidden_size}], "
                         f"got {tuple(student_weight.shape)}")
    local_vocab = student_weight.shape[0]
    if teacher_weight is not None:
        if teacher_weight.dim() != 2 or teacher_weight.shape[1] != teacher_hidden.shape[-1]:
            raise ValueError(f"teacher_weight must be [V_local, H_teacher={teacher_hidden.shape[-1]}], "
                             f"got {tuple(teacher_weight.shape)}")
        if teacher_weight.shape[0] != local_vocab:
            raise ValueError(f"teacher_weight vocabulary ({teacher_weight.shape[0]} per shard) differs "
                             f"from student_weight ({local_vocab}); teacher and student must share "
                             f"a tokenizer")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if fp8 is not None:
        _check_fp8(fp8, student_weight, teacher_weight)
    batch.validate(vocab_size=local_vocab * group_rank_and_size(tp_group)[1])
    flat = batch.flatten()
    # Tokens outside the loss mask add exactly 0 to the loss and its gradient: only loss
    # tokens go through the output layer.
    every_token = bool(flat.loss_mask.all())  # then views, no [M, H] copies
    keep = None if every_token else loss_token_index(flat.loss_mask)

    def loss_tokens(hidden: Tensor) -> Tensor:
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        return flat_hidden if keep is None else flat_hidden[keep]

    if teacher_hidden is not None:
        teacher_hidden = loss_tokens(teacher_hidden.detach())
    run = _ChunkedRun(
        config=config,
        batch=flat if keep is None else flat.token_select(keep),
        teacher_hidden=teacher_hidden,
        teacher_weight=None if teacher_weight is None else teacher_weight.detach(),
        kl_direction=get_objective(config.objective).teacher_kl_direction,
        tp_group=tp_group,
        chunk_tokens=chunk_tokens or fused_chunk_tokens(local_vocab, hidden_size),
        padded_from=first_padded_column(vocab_size, local_vocab, group_rank_and_size(tp_group)[0]),
        temperature=temperature,
        fp8=fp8,
    )
    loss = _FusedLinearLoss.apply(loss_tokens(student_hidden), student_weight, run)
    return loss, run.metrics


def _check_fp8(fp8: Fp8LossConfig, student_weight: Tensor, teacher_weight: Tensor | None) -> None:
    """ValueError if the FP8 GEMMs cannot run on these weights or this device."""
    fp8.validate()
    device = student_weight.device
    reason = fp8_unsupported_reason(torch.cuda.get_device_capability(device)
                                    if device.type == "cuda" else None)
    if reason is not None:
        raise ValueError(f"loss_fp8: {reason}")
    check_fp8_shapes(student_weight.shape[1], student_weight.shape[0], "student")
    if teacher_weight is not None and fp8.teacher:
        check_fp8_shapes(teacher_weight.shape[1], teacher_weight.shape[0], "teacher")
