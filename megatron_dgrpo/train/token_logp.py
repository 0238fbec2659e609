"""Log-probs of the target tokens from final hidden states, chunk by chunk, without grad.

The scoring passes of a step (old policy, reference) need only ``log p(target)`` per token;
with the fused loss they must not materialise ``[tokens, V_local]`` logits either. Each
chunk of ``chunk_tokens`` tokens is projected, padding columns are masked exactly as in the
fused loss, and reduced over the TP vocabulary shards to one number per token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_dgrpo.parallel.fused import (
    PADDED_VOCAB_LOGIT,
    default_chunk_tokens,
    first_padded_column,
)
from megatron_dgrpo.parallel.vocab import group_rank_and_size, vocab_parallel_terms


@torch.no_grad()
def chunked_token_logp(hidden: Tensor, weight: Tensor, targets: Tensor, vocab_size: int,
                       tp_group=None, chunk_tokens: int | None = None) -> Tensor:
    """``log softmax(hidden @ weight.T)[target]`` per token, the logits reduced in float32 at
    least (as the fused loss reduces the student's), returned as float32.

    Args:
        hidden: ``[*S, H]`` final hidden states (replicated over TP).
        weight: ``[V_local, H]`` this TP rank's output-layer shard (padded vocabulary).
        targets: int64 ``S`` global token ids.
        vocab_size: real vocabulary size; ids at and past it are TP padding (masked).
        tp_group: the vocabulary's TP group (``None``: unsharded).
        chunk_tokens: tokens per chunk (default :func:`default_chunk_tokens`).

    Returns:
        ``S`` float32 log-probs, identical on every TP rank.
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
        logits[:, padded_from:] = PADDED_VOCAB_LOGIT
        pieces.append(vocab_parallel_terms(logits, None, flat_targets[start:start + step],
                                           group=tp_group).logp)
    return torch.cat(pieces).reshape(targets.shape).float()
