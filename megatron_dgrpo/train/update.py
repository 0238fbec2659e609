"""The student's update: its forward and backward over one update's micro-batches, on
every pipeline stage, then the optimizer step.

    student_optimizer = StudentOptimizer(model, config.optim)   # Megatron DDP + Adam
    student_step = StudentStep(config, student_optimizer.ddp, teacher, vocab_size, temperature)
    # student_optimizer.ddp: one DDP-wrapped chunk per virtual pipeline stage (one at VP = 1)
    student_optimizer.zero_grad()
    loss, metrics = student_step.accumulate(plan, sequences, signals, step)  # every stage
    optim_metrics = student_optimizer.step(step, total_steps, loss)  # optim/lr, optim/grad_norm

**Forward and backward** (:class:`StudentStep`). The micro-batches
(:class:`~megatron_dgrpo.train.batch.MicroBatch`, or packs,
:class:`~megatron_dgrpo.train.packing.PackedMicroBatch`) run through Megatron's schedule
(:func:`megatron_dgrpo.models.forward.run_micro_batches`: one after the other at PP = 1,
1F1B at PP > 1, the interleaved schedule over the rank's chunks with virtual stages). On
the last stage each micro-batch's loss is computed from its final hidden states: fused
(:func:`~megatron_dgrpo.parallel.fused.loss_from_hidden` over the loss positions only) or
from materialised logits
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

**The optimizer step** (:class:`StudentOptimizer`): Megatron DDP + Megatron's Adam, the
learning-rate schedule, and the global gradient norm. The gradient norm is read after
``finalize_model_grads`` (gradients reduced over the data- and context-parallel ranks)
from each parameter's ``main_grad`` buffer, in float32 at least, before any clipping.
Tensor-parallel shards are summed over the TP group and pipeline stages over the PP group;
parameters replicated on every TP rank (norms) are counted once, and so are tied
embeddings at PP > 1 (the last stage's copy of the embedding table, marked ``shared`` by
Megatron, holds the same all-reduced gradient as the first stage's). With virtual pipeline
stages each chunk has its own DDP (and gradient buffer) and the optimizer spans them all,
as in Megatron's own trainer.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial

import torch
from torch import Tensor

from megatron_dgrpo.algorithms.inputs import TokenBatch
from megatron_dgrpo.algorithms.metrics import LossMetrics
from megatron_dgrpo.models.chunks import model_chunks
from megatron_dgrpo.models.forward import (
    hidden_from_output,
    is_last_stage,
    logits_from_output,
    output_weight,
    pipeline_group,
    run_micro_batches,
)
from megatron_dgrpo.parallel.collectives import (
    all_reduce,
    broadcast_object,
    collective_device,
    group_rank_and_size,
    last_rank,
)
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
        model: the DDP-wrapped student (this rank's stage and shard; a list of DDP-wrapped
            chunks with virtual pipeline stages).
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


def global_grad_norm(model, tp_group, pp_group=None) -> float:
    """L2 norm (over the whole model: every TP shard and pipeline stage) of the
    ``main_grad`` buffers of ``model``'s trainable parameters (``model``: a module or a
    list of chunks), identical on every rank."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    squares = torch.zeros((), dtype=torch.float64, device=collective_device(tp_group))
    for param in (p for chunk in model_chunks(model) for p in chunk.parameters()):
        grad = getattr(param, "main_grad", None)
        if (param.requires_grad and grad is not None and param_is_not_shared(param)
                and param_is_not_tensor_parallel_duplicate(param)):
            squares += grad.float().square().sum().to(squares)
    return math.sqrt(float(all_reduce(all_reduce(squares, "sum", tp_group), "sum", pp_group)))


class StudentOptimizer:
    """Megatron DDP around the student and Megatron's (non-distributed) Adam over it.

    Args:
        model: the student ``GPTModel`` (this rank's shard), or its
            :class:`~megatron_dgrpo.models.chunks.VirtualStages`.
        optim: the run's ``optim`` section (:class:`megatron_dgrpo.train.config.OptimConfig`).

    Attributes:
        ddp: the DDP-wrapped student, one DDP per chunk (a list; one entry without virtual
            stages): run the training forward through it so gradients land in its
            ``main_grad`` buffers.
        optimizer: Megatron's optimizer (its ``state_dict`` goes into checkpoints).
    """

    def __init__(self, model: torch.nn.Module, optim):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.optim = optim
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.ddp = [DistributedDataParallel(config=chunk.config, module=chunk,
                                            ddp_config=DistributedDataParallelConfig())
                    for chunk in model_chunks(model)]
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=optim.lr, weight_decay=optim.weight_decay,
                            adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2,
                            clip_grad=optim.clip_grad, params_dtype=model.config.params_dtype),
            self.ddp)

    def zero_grad(self) -> None:
        """Clear DDP's gradient buffers and the optimizer's gradients."""
        for chunk in self.ddp:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self, step: int, total_steps: int, loss: float = 0.0) -> dict[str, float]:
        """Reduce the accumulated gradients, set the schedule's learning rate for 1-based
        ``step`` and update the weights; returns ``optim/lr``, ``optim/grad_norm`` and
        ``optim/skipped``. ``loss``: the global loss these gradients are of. If it or the
        gradient norm is not finite (both are the same on every rank), nothing is updated
        (weights, Adam's moments and step count stay) and ``optim/skipped`` is 1."""
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads(self.ddp)
        grad_norm = global_grad_norm(self.ddp, self.tp_group, self.pp_group)  # before clipping
        lr = self.optim.lr_at(step, total_steps)
        if not (math.isfinite(grad_norm) and math.isfinite(loss)):
            self.zero_grad()
            return {"optim/lr": lr, "optim/grad_norm": grad_norm, "optim/skipped": 1.0}
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return {"optim/lr": lr, "optim/grad_norm": grad_norm, "optim/skipped": 0.0}
