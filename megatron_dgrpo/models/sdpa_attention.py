"""Core attention of the local (non-Transformer-Engine) layer spec on PyTorch's SDPA.

Megatron's local ``DotProductAttention`` forms the ``[b, heads, sq, sk]`` score matrix,
copies keys and values once per query head for grouped-query attention, and masks and
softmaxes in separate kernels. :class:`SDPACoreAttention` is a drop-in replacement with the
same arguments and output that calls ``torch.nn.functional.scaled_dot_product_attention``
(fused kernels on CPU and GPU, grouped-query attention without copies). Supported: vanilla
softmax, no attention dropout, no sliding window, no context parallelism (the TE spec serves
those); anything else is refused at construction.

Masks follow Megatron's convention: ``attention_mask`` is boolean with True = *masked out*,
broadcastable to ``[b, 1, sq, sk]``, and when given it is the whole mask (causal part
included). Without one, ``attn_mask_type == causal`` means query ``i`` of ``sq`` sees the
keys up to ``sk - sq + i`` (the queries are the last ``sq`` positions of the keys).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


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
        unsupported = {
            "context_parallel_size > 1": config.context_parallel_size > 1,
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
        self.softmax_scale = (softmax_scale if softmax_scale is not None
                              else 1.0 / math.sqrt(config.kv_channels))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params=None) -> torch.Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPACoreAttention takes no attention_bias or packed sequences")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
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
