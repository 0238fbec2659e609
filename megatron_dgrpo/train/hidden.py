"""A Megatron ``GPTModel`` run up to its final hidden states, for the fused loss.

``GPTModel.forward`` always ends in the output layer (``[tokens, V_local]`` logits); the
fused loss (:func:`megatron_dgrpo.parallel.fused.loss_from_hidden`) wants the final
(normalised) hidden states and the output weight instead. :func:`final_hidden_states` runs
the same two stages as ``GPTModel.forward`` (``_preprocess``: embeddings and rotary tables;
``decoder``: the transformer block, final RMSNorm included) and stops there.
:func:`output_weight` is the weight the output layer would multiply with: the embedding
table when embeddings are tied. Both are the live parameters, so gradients accumulate into
them (and Megatron DDP's ``main_grad`` buffers) exactly as through the output layer.
"""

from __future__ import annotations

import torch
from torch import Tensor


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` inside a Megatron DDP (or similar ``.module``) wrapper."""
    while hasattr(model, "module"):
        model = model.module
    return model


def final_hidden_states(model: torch.nn.Module, tokens: Tensor, positions: Tensor) -> Tensor:
    """``[B, T, H]`` final hidden states (after the last norm) for ``tokens``/``positions``
    ``[B, T]``, replicated over the TP group (gathered back if sequence parallelism split
    them; the gather's backward only splits, because the fused loss already all-reduces the
    hidden-state gradient over TP). Training path only: no inference context, no packing."""
    gpt = unwrap(model)
    if not (gpt.pre_process and gpt.post_process):
        raise ValueError("final_hidden_states needs the whole model on one pipeline stage "
                         "(parallel.pipeline_parallel=1)")
    if getattr(gpt, "mtp_process", False):
        raise ValueError("multi-token prediction heads are not supported by the fused loss")
    decoder_input, rotary_pos_emb, rotary_cos, rotary_sin, offset, _ = gpt._preprocess(
        input_ids=tokens, position_ids=positions)[:6]
    hidden = gpt.decoder(hidden_states=decoder_input, attention_mask=None,
                         rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_cos,
                         rotary_pos_sin=rotary_sin, sequence_len_offset=offset)
    if gpt.config.sequence_parallel:
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
    return hidden.transpose(0, 1)  # Megatron is sequence-first: [T, B, H] -> [B, T, H]


def output_weight(model: torch.nn.Module) -> Tensor:
    """``[V_local, H]``: this TP rank's shard of the output layer's weight (the embedding
    table when ``share_embeddings_and_output_weights``)."""
    gpt = unwrap(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight
