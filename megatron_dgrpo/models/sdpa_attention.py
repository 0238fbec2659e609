"""Core attention of the local (non-Transformer-Engine) layer spec on PyTorch's SDPA.

Megatron's local ``DotProductAttention`` forms the ``[b, heads, sq, sk]`` score matrix,
copies keys and values once per query head for grouped-query attention, and masks and
softmaxes in separate kernels. :class:`SDPACoreAttention` is a drop-in replacement with the
same arguments and output that calls ``torch.nn.functional.scaled_dot_product_attention``
(fused kernels on CPU and GPU, grouped-query attention without copies). Supported: vanilla
softmax, no attention dropout, no sliding window (the TE spec serves those); anything else
is refused at construction.

Context parallelism (``cp_comm_type="allgather"`` only): each CP rank holds the
load-balanced shard of the sequence (chunks ``r`` and ``2 * cp - 1 - r`` of ``2 * cp``, see
:mod:`megatron_dgrpo.parallel.context`). Keys and values are all-gathered over the CP group
and put back in sequence order; the local queries attend to them causally by their global
positions. The backward sums each rank's key/value gradients over the group and keeps the
rank's own shard. Exact; each rank holds the whole sequence's keys and values.

Packed sequences (Megatron's THD format, ``packed_seq_params.qkv_format == "thd"``): the
queries, keys and values are ``[t, heads, d]`` for several sequences back to back, segment
``i`` being ``[cu[i], cu[i + 1])`` of ``cu_seqlens_q_padded`` (``cu_seqlens_q`` without
padding; the boundaries Megatron's THD rotary embedding restarts positions at). Each
segment attends causally within itself (one SDPA call per segment: the cost is
``sum len_i^2``, not ``t^2``); alignment padding at a segment's end sees the segment but no
real token sees it. With context parallelism (Megatron's THD layout: every segment cut into
``2 * cp`` chunks of its own, rank ``r`` holding chunks ``r`` and ``2 * cp - 1 - r`` of each,
segment after segment) the keys and values are all-gathered once and each segment's are
put back in order; its local queries see them by their global positions, as above.

Decoding with the static KV cache: Megatron's ``SelfAttention`` stores keys before the rotary
embedding and rotates the whole cache again at every decode step (``O(cache)`` extra work per
token and layer). :class:`RotatedCacheSelfAttention` rotates each new key once, stores it
rotated, and rotates only the queries afterwards: the same values (the same operation on
the same keys), done once.

Masks follow Megatron's convention: ``attention_mask`` is boolean with True = *masked out*,
broadcastable to ``[b, 1, sq, sk]``, and when given it is the whole mask (causal part
included). Without one, ``attn_mask_type == causal`` means query ``i`` of ``sq`` sees the
keys up to ``sk - sq + i`` (the queries are the last ``sq`` positions of the keys).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_dgrpo.parallel.collectives import all_gather_tensors, all_reduce, group_rank_and_size
from megatron_dgrpo.parallel.context import cp_unshard


class SDPACoreAttention(MegatronModule):
    """Same constructor and ``forward`` contract as Megatron's ``DotProductAttention``.

    ``forward(query [sq, b, heads_local, d], key / value [sk, b, groups_local, d],
    attention_mask, attn_mask_type)`` returns the context ``[sq, b, heads_local * d]``.
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection=None):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        comm_type = cp_comm_type or config.cp_comm_type
        unsupported = {
            f"context parallelism with cp_comm_type={comm_type!r} (only 'allgather')":
                config.context_parallel_size > 1 and comm_type != "allgather",
            f"softmax_type={config.softmax_type!r}": config.softmax_type != "vanilla",
            "attention dropout": dropout > 0,
            "window_size": config.window_size is not None,
            "apply_query_key_layer_scaling": config.apply_query_key_layer_scaling,
        }
        refused = [name for name, present in unsupported.items() if present]
        if refused:
            raise ValueError(f"SDPACoreAttention does not support {', '.join(refused)}; "
                             "use the Transformer Engine layer spec")
        self.attn_mask_type = attn_mask_type
        self.cp_group = None
        if config.context_parallel_size > 1:
            from megatron.core import parallel_state as ps

            self.cp_group = (pg_collection.cp if pg_collection is not None
                             else ps.get_context_parallel_group())
        self.softmax_scale = (softmax_scale if softmax_scale is not None
                              else 1.0 / math.sqrt(config.kv_channels))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params=None) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention takes no attention_bias")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if packed_seq_params is not None:
            return self._packed(query, key, value, attention_mask, mask_type, packed_seq_params)
        if self.cp_group is not None:
            if attention_mask is not None or mask_type != AttnMaskType.causal:
                raise ValueError("SDPACoreAttention with context parallelism supports causal "
                                 "attention without an explicit mask only")
            key, value, attention_mask = _gather_context(query, key, value, self.cp_group)
        sq, batch, heads, head_dim = query.shape
        sk, groups = key.shape[0], key.shape[2]
        allowed, is_causal = None, False
        if attention_mask is not None:
            allowed = ~attention_mask
        elif mask_type == AttnMaskType.causal and sq > 1:
            if sq == sk:
                is_causal = True
            else:
                allowed = torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril(sk - sq)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=is_causal,
                                                 scale=self.softmax_scale,
                                                 enable_gqa=heads != groups)
        return context.permute(2, 0, 1, 3).reshape(sq, batch, heads * head_dim)

    def _packed(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, mask_type: AttnMaskType,
                packed) -> torch.Tensor:
        """Causal attention within each packed segment: ``query [t, heads, d]``, ``key`` /
        ``value [t, groups, d]`` -> ``[t, heads * d]``. With context parallelism ``t`` holds
        this rank's shard of every segment (the ``cu_seqlens`` count whole segments)."""
        if packed.qkv_format != "thd" or attention_mask is not None \
                or mask_type != AttnMaskType.causal:
            raise ValueError("SDPACoreAttention takes packed sequences in THD format, causal, "
                             "without an explicit mask")
        bounds = packed.cu_seqlens_q_padded if packed.cu_seqlens_q_padded is not None \
            else packed.cu_seqlens_q
        bounds = bounds.tolist()
        total, heads, head_dim = query.shape
        rank, cp = (0, 1) if self.cp_group is None else group_rank_and_size(self.cp_group)
        if bounds[0] != 0 or bounds[-1] != total * cp:
            raise ValueError(f"packed segments cover [{bounds[0]}, {bounds[-1]}) of {total * cp} "
                             f"tokens; they must cover all of them")
        if cp > 1:
            if any((stop - start) % (2 * cp) for start, stop in zip(bounds[:-1], bounds[1:])):
                raise ValueError(f"packed segments of lengths {bounds} (cumulative) must each be "
                                 f"a multiple of 2 * CP = {2 * cp}")
            all_keys, all_values = (_GatherShards.apply(t, self.cp_group) for t in (key, value))
        pieces = []
        for start, stop in zip(bounds[:-1], bounds[1:]):
            if stop == start:
                continue
            local = slice(start // cp, stop // cp)
            visible = None
            if cp == 1:
                segment_key, segment_value = key[local], value[local]
            else:  # the whole segment's keys/values from every rank's shard of it
                segment_key, segment_value = (cp_unshard(list(t[:, local]), seq_dim=0)
                                              for t in (all_keys, all_values))
                visible = _visible_keys(rank, cp, (stop - start) // (2 * cp), query.device)
            # [s, h, d] -> [1, h, s, d]
            q, k, v = (t.transpose(0, 1)[None] for t in (query[local], segment_key,
                                                         segment_value))
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=visible,
                                                     is_causal=visible is None,
                                                     scale=self.softmax_scale,
                                                     enable_gqa=heads != key.shape[1])
            pieces.append(context[0].transpose(0, 1))
        return torch.cat(pieces).reshape(total, heads * head_dim)


class _GatherShards(torch.autograd.Function):
    """``[cp, *shard.shape]``: every CP rank's ``shard``. Backward: the gradient summed over
    the ranks (each rank's queries contribute to every shard), this rank's slice of it."""

    @staticmethod
    def forward(ctx, shard: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return torch.stack(all_gather_tensors(shard, group))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = all_reduce(grad.contiguous(), "sum", ctx.group)
        return grad[group_rank_and_size(ctx.group)[0]], None


def _visible_keys(rank: int, cp: int, chunk: int, device) -> torch.Tensor:
    """``[2 * chunk, 2 * cp * chunk]`` bool, True where CP rank ``rank``'s local query (its
    load-balanced chunks ``rank`` and ``2 * cp - 1 - rank`` of a sequence cut into ``2 * cp``
    chunks of ``chunk`` tokens) sees the key: at or before its global position."""
    query_positions = torch.cat([
        torch.arange(rank * chunk, (rank + 1) * chunk, device=device),
        torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk, device=device)])
    key_positions = torch.arange(2 * cp * chunk, device=device)
    return key_positions[None, :] <= query_positions[:, None]


def _gather_context(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group):
    """Whole-sequence ``key``/``value`` ``[T, b, groups, d]`` from this rank's load-balanced
    shards ``[T / cp, b, groups, d]``, and the mask (True = masked out) ``[T / cp, T]`` that
    lets each local query see the keys at or before its global position."""
    rank, cp = group_rank_and_size(group)
    full_key, full_value = (cp_unshard(list(_GatherShards.apply(t, group)), seq_dim=0)
                            for t in (key, value))
    return full_key, full_value, ~_visible_keys(rank, cp, query.shape[0] // 2, query.device)


class RotatedCacheSelfAttention(SelfAttention):
    """Megatron's ``SelfAttention`` whose static KV cache holds keys already rotated.

    With a static-batching inference context, each new key ``[s, b, groups_local, d]`` (at
    cache positions ``offset .. offset + s``) is rotated with its positions' rotary
    embedding before Megatron stores it, and the key rotary embedding handed on is ``None``,
    so ``forward`` rotates the queries only. Training (no inference context), dynamic
    batching and flash decoding take Megatron's own path unchanged."""

    def _adjust_key_value_for_inference(self, inference_context, query, key, value,
                                        rotary_pos_emb, *args, **kwargs):
        static = (inference_context is not None and inference_context.is_static_batching()
                  and rotary_pos_emb is not None and not self.config.flash_decode)
        if not static:
            return super()._adjust_key_value_for_inference(
                inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
        start = inference_context.sequence_len_offset
        key = apply_rotary_pos_emb(key, rotary_pos_emb[1][start:start + key.size(0)],
                                   config=self.config,
                                   mscale=_yarn_get_concentration_factor_from_config(self.config),
                                   cp_group=self.pg_collection.cp)
        query, key, value, (query_emb, _), mask_type, block_table = (
            super()._adjust_key_value_for_inference(inference_context, query, key, value,
                                                    rotary_pos_emb, *args, **kwargs))
        return query, key, value, (query_emb, None), mask_type, block_table
