"""The student's forward and backward over one update's micro-batches, on every pipeline stage.

    student_step = StudentStep(config, ddp_student, teacher, vocab_size, temperature)
    loss, metrics = student_step.accumulate(plan, sequences, signals, step)  # every stage

The micro-batches (:class:`~megatron_dgrpo.train.batch.MicroBatch`, or packs,
:class:`~megatron_dgrpo.train.packing.PackedMicroBatch`) run through Megatron's schedule
(:func:`megatron_dgrpo.models.pipeline.run_micro_batches`: one after the other at PP = 1,
1F1B at PP > 1). On the last stage each micro-batch's loss is computed from its final
hidden states: fused (:func:`~megatron_dgrpo.parallel.fused.loss_from_hidden` over the
loss positions only) or from materialised logits
(:func:`~megatron_dgrpo.parallel.materialized.loss_from_logits`, PP = 1). The teacher's
outputs reach the same stage without ``[T, V]`` logits in the fused loss
(:class:`~megatron_dgrpo.train.sources.MegatronTeacher`: per micro-batch at PP = 1, its
own pipeline over the same micro-batches first at PP > 1; student and teacher share the
layout, so their last stages are the same ranks).

Gradients accumulate in Megatron DDP's buffers. The loss pieces are this rank's shares of
the global loss (weights with global normalisers, train/loop.py) and are backpropagated
as they are: with ``calculate_per_token_loss`` (models/provider.py) Megatron's schedules
do not divide them by the number of micro-batches and DDP sums, not averages, gradients
over the data- and context-parallel ranks. The last stage's loss and metrics are handed to
the other stages, so :meth:`StudentStep.accumulate` returns the same on every rank of a
pipeline.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
from torch import Tensor

from megatron_dgrpo.algorithms.inputs import TokenBatch
from megatron_dgrpo.algorithms.metrics import LossMetrics
from megatron_dgrpo.models.pipeline import is_last_stage, pipeline_group, run_micro_batches
from megatron_dgrpo.parallel.collectives import broadcast_object, group_rank_and_size, last_rank
from megatron_dgrpo.parallel.fused import loss_from_hidden, loss_token_index
from megatron_dgrpo.parallel.materialized import loss_from_logits
from megatron_dgrpo.rollout.sequences import SequenceBatch
from megatron_dgrpo.train import faults
from megatron_dgrpo.train.config import RunConfig
from megatron_dgrpo.train.sources import TeacherSource


class StudentStep:
    """Forward and backward of the student's micro-batches (see the module docstring).

    Args:
        config: the run's config (loss, ``loss_impl``, chunking, FP8).
        model: the DDP-wrapped student (this rank's stage and shard).
        teacher: the run's teacher source, or ``None``.
        vocab_size: the real vocabulary size (ids past it are TP padding).
        temperature: the trained policy's temperature.
    """

    def __init__(self, config: RunConfig, model: torch.nn.Module,
                 teacher: TeacherSource | None, vocab_size: int, temperature: float):
        from megatron.core import parallel_state as ps

        self.config, self.model, self.teacher = config, model, teacher
        self.vocab_size, self.temperature = vocab_size, temperature
        self.fused = config.loss_impl == "fused"
        self.tp_group = ps.get_tensor_model_parallel_group()

    def accumulate(self, plan: list, sequences: SequenceBatch, signals: TokenBatch,
                   step: int) -> tuple[Tensor, LossMetrics]:
        """Forward and backward of every micro-batch of ``plan`` over ``sequences`` /
        ``signals`` (this rank's batch of 1-based optimizer step ``step``); returns this
        rank's loss and its metrics."""
        parts = [micro_batch.sequences(sequences) for micro_batch in plan]
        inputs = [micro_batch.stage_input(part) for micro_batch, part in zip(plan, parts)]
        tokens = [micro_batch.tokens(signals) for micro_batch in plan]
        keeps = [loss_token_index(batch.loss_mask) for batch in tokens]
        teacher = self.teacher
        with teacher.active() if teacher is not None else contextlib.nullcontext():
            teacher_outputs = teacher.outputs(inputs, keeps) if teacher is not None else None
            loss_of = partial(self._loss, tokens, keeps, step)
            records = run_micro_batches(self.model, inputs, loss_of,
                                        forward_only=False, prepare=teacher_outputs)
        device = sequences.tokens.device
        loss, metrics = torch.zeros((), device=device), LossMetrics()
        for piece, piece_metrics in records:
            loss, metrics = loss + piece, metrics.merge(piece_metrics)
        return self._from_last_stage(loss, metrics, device)

    def _loss(self, tokens: list[TokenBatch], keeps: list[Tensor], step: int, index: int,
              output: Tensor, teacher_outputs) -> tuple[Tensor, tuple[Tensor, LossMetrics]]:
        """Micro-batch ``index``'s loss from the last stage's ``output``; with the record
        ``(loss, metrics)`` (detached)."""
        from megatron_dgrpo.models.provider import (
            hidden_from_output,
            logits_from_output,
            output_weight,
        )

        config, batch = self.config, tokens[index]
        if self.fused:
            hidden, keep = hidden_from_output(self.model, output), keeps[index]
            piece, metrics = loss_from_hidden(
                config.loss, batch.flatten().token_select(keep),
                hidden.reshape(-1, hidden.shape[-1])[keep], output_weight(self.model),
                *(teacher_outputs or (None, None)), self.tp_group, config.loss_chunk_tokens,
                vocab_size=self.vocab_size, temperature=self.temperature, fp8=config.loss_fp8)
        else:
            piece, metrics = loss_from_logits(
                config.loss, batch, logits_from_output(self.model, output, self.vocab_size),
                teacher_outputs, self.tp_group, temperature=self.temperature)
        if faults.fires("loss.nan", step):  # fault injection (tests/reliability)
            piece = piece * float("nan")
        return piece, (piece.detach(), metrics)

    @staticmethod
    def _from_last_stage(loss: Tensor, metrics: LossMetrics,
                         device: torch.device) -> tuple[Tensor, LossMetrics]:
        """The last pipeline stage's ``loss`` and ``metrics`` on every stage."""
        group = pipeline_group()
        if group_rank_and_size(group)[1] == 1:
            return loss, metrics
        payload = (loss.cpu(), metrics.to("cpu")) if is_last_stage() else None
        loss, metrics = broadcast_object(payload, last_rank(group), group)
        return loss.to(device), metrics.to(device)
