"""Running a built Megatron ``GPTModel``: one stage's output, the loss's inputs, and
Megatron's pipeline schedules over a step's micro-batches (training and no-grad scoring).

    output = stage_output(model, tokens, positions)          # this rank's stage, [T, B, H]
    records = run_micro_batches(model, inputs, on_last_stage, forward_only=False)

**One stage.** :func:`stage_output` runs this rank's pipeline stage as ``GPTModel.forward``
does (``_preprocess``: embeddings on the first stage, rotary tables; ``decoder``: this
stage's transformer layers, the final RMSNorm on the last) and stops before the output
layer; on the last stage :func:`hidden_from_output` turns that into the ``[B, T, H]`` final
hidden states of the fused loss and :func:`logits_from_output` into the masked logits of
the materialised one. :func:`final_hidden_states` is both steps on a whole (PP = 1) model;
:func:`output_weight` is the weight the output layer multiplies with (the embedding table
when embeddings are tied); :func:`masked_logits` is the full forward with the padding
columns masked. All use the live parameters, so gradients accumulate into them (and
Megatron DDP's ``main_grad`` buffers) exactly as through ``GPTModel.forward``.

Packed sequences (THD): ``tokens``/``positions`` ``[1, L]`` hold several sequences back to
back and ``packed`` (:func:`thd_params`) their boundaries; attention stays within each
sequence and rotary positions restart at 0 in each (Megatron's THD rotary, TE's or
:class:`~megatron_dgrpo.models.sdpa_attention.SDPACoreAttention`'s segment attention).

**The schedule.** ``get_forward_backward_func`` picks the schedule of this rank's layout:
without pipeline parallelism the micro-batches run one after the other; at PP > 1
Megatron's 1F1B schedule runs them (``PP - 1 - stage`` warm-up forwards, then one forward
and one backward at a time, then the cool-down backwards), each stage sending its
activations to the next stage and their gradients back, point to point. Micro-batches are
trimmed to their own width and rows, so stages exchange each tensor's shape first
(``variable_seq_lengths``, set with the model config in
:mod:`megatron_dgrpo.models.provider`). With virtual pipeline stages
(:mod:`megatron_dgrpo.models.chunks`) ``model`` is the rank's chunks and Megatron's
interleaved schedule runs them: micro-batches go through chunk 0 of every rank, then chunk
1, ..., in groups of ``PP`` micro-batches (``microbatch_group_size_per_vp_stage``), which
needs the number of micro-batches to be a multiple of ``PP``; a step with another count is
topped up with copies of its last micro-batch whose loss is multiplied by zero (forward
only: whose records are dropped), so the step's loss, gradients and records are exactly
those of its own micro-batches (at the cost of up to ``PP - 1`` extra micro-batches).

On the last stage, ``on_last_stage(index, output, prepared)`` receives micro-batch
``index``'s :func:`stage_output` and ``prepare(index)``'s value, computed there just before
that micro-batch's forward (e.g. a teacher's outputs, so that only one micro-batch's exist
at a time). Training: it returns ``(loss, record)`` and the backward runs from ``loss``
exactly as returned (the model config's ``calculate_per_token_loss``: Megatron scales
nothing); forward-only: it returns the record. The records come back on the last stage, in
micro-batch order.

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

from megatron_dgrpo.models.chunks import model_chunks
from megatron_dgrpo.parallel.collectives import broadcast_tensor, last_rank


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` inside a Megatron DDP (or similar ``.module``) wrapper."""
    while hasattr(model, "module"):
        model = model.module
    return model


def thd_params(cu_seqlens: torch.Tensor, cu_seqlens_padded: torch.Tensor):
    """Megatron's ``PackedSeqParams`` (``qkv_format="thd"``) of sequences packed back to back:
    ``cu_seqlens`` int32 ``[n + 1]`` cumulative real lengths, ``cu_seqlens_padded`` the
    cumulative lengths after each sequence's alignment padding (where each one starts)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    longest = int((cu_seqlens_padded[1:] - cu_seqlens_padded[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           cu_seqlens_q_padded=cu_seqlens_padded,
                           cu_seqlens_kv_padded=cu_seqlens_padded, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def stage_output(model: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor,
                 packed=None) -> torch.Tensor:
    """This pipeline stage's output ``[T_local, B, H]`` (sequence-first, split over TP under
    sequence parallelism) for ``tokens``/``positions`` ``[B, T]``: the first stage embeds
    them, later stages read the previous stage's output (Megatron's ``set_input_tensor``);
    on the last stage it is the final hidden states after the last norm. Training path
    only: no inference context. ``packed``: :func:`thd_params` for ``[1, L]`` packed rows."""
    gpt = unwrap(model)
    if getattr(gpt, "mtp_process", False):
        raise ValueError("multi-token prediction heads are not supported by the fused loss")
    decoder_input, rotary_pos_emb, rotary_cos, rotary_sin, offset, _ = gpt._preprocess(
        input_ids=tokens, position_ids=positions, packed_seq_params=packed)[:6]
    return gpt.decoder(hidden_states=decoder_input, attention_mask=None,
                       rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_cos,
                       rotary_pos_sin=rotary_sin, sequence_len_offset=offset,
                       packed_seq_params=packed)


def hidden_from_output(model: torch.nn.Module, output: torch.Tensor) -> torch.Tensor:
    """``[B, T, H]`` final hidden states from the last stage's :func:`stage_output`,
    replicated over the TP group (gathered back if sequence parallelism split them; the
    gather's backward only splits, because the fused loss already all-reduces the
    hidden-state gradient over TP). ``model``: the stage's model, or its chunks."""
    if unwrap(model_chunks(model)[-1]).config.sequence_parallel:
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        output = gather_from_sequence_parallel_region(output, tensor_parallel_output_grad=False)
    return output.transpose(0, 1)  # Megatron is sequence-first: [T, B, H] -> [B, T, H]


def logits_from_output(model: torch.nn.Module, output: torch.Tensor,
                       vocab_size: int) -> torch.Tensor:
    """``[B, T, V_local]`` logits of this TP rank from the last stage's :func:`stage_output`
    (the output layer as ``GPTModel.forward`` applies it), the padding columns (ids at and
    past ``vocab_size``) set to :data:`~megatron_dgrpo.parallel.vocab.PADDED_VOCAB_LOGIT`."""
    from megatron.core import parallel_state as ps

    from megatron_dgrpo.parallel.vocab import mask_padded_vocab

    gpt = unwrap(model_chunks(model)[-1])
    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights \
        else None
    logits, _ = gpt.output_layer(output, weight=weight)
    return mask_padded_vocab(logits.transpose(0, 1).contiguous(), vocab_size,
                             ps.get_tensor_model_parallel_rank())


def _whole(model: torch.nn.Module, what: str) -> torch.nn.Module:
    chunks = model_chunks(model)
    gpt = unwrap(chunks[0])
    if len(chunks) > 1 or not (gpt.pre_process and gpt.post_process):
        raise ValueError(f"{what} needs the whole model on one pipeline stage "
                         "(parallel.pipeline_parallel=1); with PP > 1 run it through "
                         "run_micro_batches (megatron_dgrpo.models.forward)")
    return gpt


def final_hidden_states(model: torch.nn.Module, tokens: torch.Tensor,
                        positions: torch.Tensor, packed=None) -> torch.Tensor:
    """``[B, T, H]`` final hidden states (after the last norm) for ``tokens``/``positions``
    ``[B, T]`` of a whole (PP = 1) model, replicated over the TP group
    (:func:`stage_output`, then :func:`hidden_from_output`)."""
    _whole(model, "final_hidden_states")
    return hidden_from_output(model, stage_output(model, tokens, positions, packed))


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """``[V_local, H]``: this TP rank's shard of the output layer's weight (the embedding
    table when ``share_embeddings_and_output_weights``); of the last chunk when ``model``
    is a rank's virtual stages."""
    gpt = unwrap(model_chunks(model)[-1])
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def masked_logits(model: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor,
                  vocab_size: int, packed=None) -> torch.Tensor:
    """``[B, T, V_local]`` logits of this TP rank of a whole (PP = 1) model for
    ``tokens``/``positions`` ``[B, T]``, the padding columns (ids at and past
    ``vocab_size``) set to :data:`~megatron_dgrpo.parallel.vocab.PADDED_VOCAB_LOGIT`."""
    from megatron.core import parallel_state as ps

    from megatron_dgrpo.parallel.vocab import mask_padded_vocab

    _whole(model, "masked_logits")
    logits = model(tokens, positions, None, packed_seq_params=packed)
    return mask_padded_vocab(logits, vocab_size, ps.get_tensor_model_parallel_rank())


def loss_inputs(model: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor,
                vocab_size: int, fused: bool, packed=None):
    """What the loss reads from a whole (PP = 1) ``model`` for ``tokens``/``positions``
    ``[B, T]``: with ``fused``, ``([B, T, H]`` final hidden states, ``[V_local, H]`` output
    weight) (the logits are formed chunk by chunk inside the loss); otherwise ``[B, T,
    V_local]`` masked logits (:func:`masked_logits`)."""
    if fused:
        return final_hidden_states(model, tokens, positions, packed), output_weight(model)
    return masked_logits(model, tokens, positions, vocab_size, packed)


@dataclass
class StageInput:
    """One micro-batch's model inputs: ``tokens`` / ``positions`` int64 ``[B, T]`` (this
    CP rank's shard under CP), and for packed rows (``B = 1``) Megatron's THD
    ``PackedSeqParams`` (:func:`thd_params`)."""

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


def run_micro_batches(model: torch.nn.Module | Sequence[torch.nn.Module],
                      inputs: Sequence[StageInput],
                      on_last_stage: Callable[[int, Tensor, Any], Any], *, forward_only: bool,
                      prepare: Callable[[int], Any] | None = None) -> list:
    """Run ``model`` (this rank's stage, DDP-wrapped for training; with virtual stages its
    chunks, a :class:`~megatron_dgrpo.models.chunks.VirtualStages` or a list) over
    ``inputs`` through Megatron's schedule (see the module docstring); call on every rank
    of the pipeline with the same number of micro-batches. Returns the records on the last
    stage, ``[]`` on the other stages."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not inputs:
        return []
    chunks, last = model_chunks(model), is_last_stage()
    count = len(inputs)
    if len(chunks) > 1:  # the interleaved schedule runs micro-batches in groups of PP
        pp = ps.get_pipeline_model_parallel_world_size()
        count = -(-count // pp) * pp
    real = len(inputs)

    def loss_func(index: int, prepared: Any, output: Tensor):
        if index >= real:  # a top-up copy: no loss, no gradient, no record
            return output.sum() * 0.0, torch.zeros((), dtype=torch.int, device=output.device), \
                None
        result = on_last_stage(index, output, prepared)
        loss, record = (output.new_zeros(()), result) if forward_only else result
        # (loss, tokens, record): with calculate_per_token_loss the loss is left as it is
        return loss, torch.zeros((), dtype=torch.int, device=output.device), record

    def forward_step(data_iterator, stage_model):
        index = next(data_iterator)
        holds_last = last and unwrap(stage_model).post_process
        prepared = prepare(index) if prepare is not None and holds_last and index < real \
            else None
        item = inputs[min(index, real - 1)]
        output = stage_output(stage_model, item.tokens, item.positions, item.packed)
        return output, partial(loss_func, index, prepared)

    iterators = [iter(range(count)) for _ in chunks]
    records = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0], model=chunks,
        num_microbatches=count, seq_length=max(i.tokens.shape[1] for i in inputs),
        micro_batch_size=max(i.tokens.shape[0] for i in inputs), forward_only=forward_only)
    return list(records)[:real] if last else []  # in micro-batch order: top-ups last


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
