"""Loss from full (possibly vocabulary-sharded) logits: the plain path for short sequences.

Holds ``[tokens, V_local]`` logits per model; use :mod:`megatron_dgrpo.parallel.fused` when
that does not fit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_dgrpo.algorithms.inputs import TokenBatch
from megatron_dgrpo.algorithms.metrics import LossMetrics
from megatron_dgrpo.algorithms.objectives import LossConfig, evaluate, get_objective
from megatron_dgrpo.parallel.collectives import group_rank_and_size
from megatron_dgrpo.parallel.vocab import vocab_parallel_terms


def check_logits_shapes(batch: TokenBatch, student: Tensor, teacher: Tensor | None,
                        student_name: str, teacher_name: str) -> None:
    """``student``/``teacher`` must be ``[*S, X]`` for the batch's token shape ``S`` and
    share ``X`` (the vocabulary shard, or the hidden size for hidden states)."""
    token_shape = tuple(batch.loss_mask.shape)
    if tuple(student.shape[:-1]) != token_shape:
        raise ValueError(f"{student_name} must have shape [*S, X] with S={token_shape} "
                         f"(loss_mask), got {tuple(student.shape)}")
    if teacher is not None and tuple(teacher.shape[:-1]) != token_shape:
        raise ValueError(f"{teacher_name} must have shape [*S, X] with S={token_shape} "
                         f"(loss_mask), got {tuple(teacher.shape)}")


def check_temperature(temperature: float) -> None:
    """The loss divides logits by ``temperature``: it must be a positive number."""
    if not temperature > 0:
        raise ValueError(f"the loss temperature must be > 0, got {temperature}")


def loss_from_logits(config: LossConfig, batch: TokenBatch, student_logits: Tensor,
                     teacher_logits: Tensor | None = None, tp_group=None,
                     temperature: float = 1.0) -> tuple[Tensor, LossMetrics]:
    """This rank's share of the global loss, and its metrics.

    Args:
        config: the objective (validated here).
        batch: per-token signals with global aggregation weights; token shape ``S``.
        student_logits: ``[*S, V_local]``, this TP rank's vocabulary shard.
        teacher_logits: ``[*S, V_local]`` teacher shard (same vocabulary), or ``None``.
        tp_group: tensor-parallel group over which the vocabulary is sharded
            (``None``: unsharded).
        temperature: both models' logits are divided by it before the loss (the trained
            policy is ``softmax(logits / T)``).

    Returns:
        ``(loss, metrics)``: scalar loss, identical on all TP ranks; summing it over
        microbatches and DP/CP ranks gives the global loss.
    """
    config.validate()
    check_logits_shapes(batch, student_logits, teacher_logits, "student_logits", "teacher_logits")
    local_vocab = student_logits.shape[-1]
    if teacher_logits is not None and teacher_logits.shape[-1] != local_vocab:
        raise ValueError(f"teacher_logits vocabulary ({teacher_logits.shape[-1]} per shard) differs "
                         f"from student_logits ({local_vocab}); teacher and student must share "
                         f"a tokenizer")
    batch.validate(vocab_size=local_vocab * group_rank_and_size(tp_group)[1])
    flat = batch.flatten()
    check_temperature(temperature)
    # bf16 logits are reduced in float32 (a bf16 log-sum-exp is off by ~1e-2 nats).
    compute = torch.promote_types(student_logits.dtype, torch.float32)
    student = student_logits.reshape(-1, local_vocab).to(compute)
    teacher = (None if teacher_logits is None
               else teacher_logits.reshape(-1, local_vocab).to(compute))
    if temperature != 1.0:
        student = student / temperature
        teacher = None if teacher is None else teacher / temperature
    terms = vocab_parallel_terms(student, teacher,
                                 flat.targets,
                                 flat.teacher_topk_indices,
                                 get_objective(config.objective).teacher_kl_direction, tp_group)
    return evaluate(config, terms, flat)
