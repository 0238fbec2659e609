"""Megatron's pipeline schedules over a step's micro-batches: training and no-grad scoring.

    records = run_micro_batches(model, inputs, on_last_stage, forward_only=False)

``get_forward_backward_func`` picks the schedule of this rank's layout: without pipeline
parallelism the micro-batches run one after the other; at PP > 1 Megatron's 1F1B schedule
runs them (``PP - 1 - stage`` warm-up forwards, then one forward and one backward at a
time, then the cool-down backwards), each stage sending its activations to the next stage
and their gradients back, point to point. Micro-batches are trimmed to their own width and
rows, so stages exchange each tensor's shape first (``variable_seq_lengths``, set with the
model config in :mod:`megatron_dgrpo.models.provider`). Every rank holds one contiguous
stage: no virtual (interleaved) stages, which the checkpoint mapping, the refit stream and
the memory plan do not describe.

On the last stage, ``on_last_stage(index, output, prepared)`` receives micro-batch
``index``'s :func:`~megatron_dgrpo.models.provider.stage_output` (``[T, B, H]``, see
:func:`~megatron_dgrpo.models.provider.hidden_from_output`) and ``prepare(index)``'s value,
computed there just before that micro-batch's forward (e.g. a teacher's outputs, so that
only one micro-batch's exist at a time). Training: it returns ``(loss, record)`` and the
backward runs from ``loss`` exactly as returned (the model config's
``calculate_per_token_loss``: Megatron scales nothing); forward-only: it returns the
record. The records come back on the last stage, in micro-batch order.

:func:`micro_batch_logp` / :func:`token_logp` score targets under a model this way (no
grad) and hand the result to every stage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from megatron_dgrpo.models.provider import hidden_from_output, output_weight, stage_output
from megatron_dgrpo.parallel.collectives import broadcast_tensor, last_rank


@dataclass
class StageInput:
    """One micro-batch's model inputs: ``tokens`` / ``positions`` int64 ``[B, T]`` (this
    CP rank's shard under CP), and for packed rows (``B = 1``) Megatron's THD
    ``PackedSeqParams`` (:func:`~megatron_dgrpo.models.provider.thd_params`)."""

    tokens: Tensor
    positions: Tensor
    packed: Any = None


def pipeline_group():
    """This rank's pipeline-parallel group (Megatron's)."""
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_group()


def is_last_stage() -> bool:
    """Whether this rank holds the last pipeline stage (every rank at PP = 1)."""
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_last_stage()


def run_micro_batches(model: torch.nn.Module, inputs: Sequence[StageInput],
                      on_last_stage: Callable[[int, Tensor, Any], Any], *, forward_only: bool,
                      prepare: Callable[[int], Any] | None = None) -> list:
    """Run ``model`` (this rank's stage, DDP-wrapped for training) over ``inputs`` through
    Megatron's schedule (see the module docstring); call on every rank of the pipeline
    with the same number of micro-batches. Returns the records on the last stage, ``[]``
    on the other stages."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not inputs:
        return []
    last = is_last_stage()

    def loss_func(index: int, prepared: Any, output: Tensor):
        result = on_last_stage(index, output, prepared)
        loss, record = (output.new_zeros(()), result) if forward_only else result
        # (loss, tokens, record): with calculate_per_token_loss the loss is left as it is
        return loss, torch.zeros((), dtype=torch.int, device=output.device), record

    def forward_step(data_iterator, stage_model):
        index = next(data_iterator)
        prepared = prepare(index) if prepare is not None and last else None
        item = inputs[index]
        output = stage_output(stage_model, item.tokens, item.positions, item.packed)
        return output, partial(loss_func, index, prepared)

    records = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(range(len(inputs))), model=[model],
        num_microbatches=len(inputs), seq_length=max(i.tokens.shape[1] for i in inputs),
        micro_batch_size=max(i.tokens.shape[0] for i in inputs), forward_only=forward_only)
    return list(records) if last else []


def from_last_stage(tensor: Tensor) -> Tensor:
    """The last pipeline stage's ``tensor`` on every stage of this rank's pipeline (in
    place: the other stages pass a buffer of the same shape and dtype)."""
    group = pipeline_group()
    return broadcast_tensor(tensor, last_rank(group), group)


@torch.no_grad()
def micro_batch_logp(model: torch.nn.Module, inputs: Sequence[StageInput],
                     targets: Sequence[Tensor], loss_masks: Sequence[Tensor], vocab_size: int,
                     chunk_tokens: int | None = None, temperature: float = 1.0) -> list[Tensor]:
    """For each micro-batch, ``[B, T]`` float32 log-probs ``log_softmax(logits /
    temperature)`` of ``targets`` at the positions where ``loss_masks`` is True (0
    elsewhere), on every rank of the pipeline.

    Only the loss positions reach the output layer, chunk by chunk and vocabulary-parallel
    (:func:`megatron_dgrpo.parallel.vocab.target_logp`): peak memory is ``chunk_tokens x
    V_local`` logits whatever ``B x T``. All TP ranks call with the same tensors (under
    CP: this rank's shard; gather the result with ``cp_all_gather``)."""
    from megatron.core import parallel_state as ps

    from megatron_dgrpo.parallel.vocab import target_logp

    tp_group = ps.get_tensor_model_parallel_group()

    def score(index: int, output: Tensor, _prepared: Any) -> Tensor:
        hidden, mask = hidden_from_output(model, output), loss_masks[index]
        out = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
        out[mask] = target_logp(hidden[mask], output_weight(model), targets[index][mask],
                                vocab_size, tp_group, chunk_tokens, temperature)
        return out

    records = run_micro_batches(model, inputs, score, forward_only=True)
    return [from_last_stage(records[index] if records else
                            torch.zeros(mask.shape, dtype=torch.float32, device=mask.device))
            for index, mask in enumerate(loss_masks)]


def token_logp(model: torch.nn.Module, tokens: Tensor, positions: Tensor, targets: Tensor,
               loss_mask: Tensor, vocab_size: int, chunk_tokens: int | None = None,
               temperature: float = 1.0, packed: Any = None) -> Tensor:
    """:func:`micro_batch_logp` of one micro-batch ``[B, T]``."""
    return micro_batch_logp(model, [StageInput(tokens, positions, packed)], [targets],
                            [loss_mask], vocab_size, chunk_tokens, temperature)[0]
