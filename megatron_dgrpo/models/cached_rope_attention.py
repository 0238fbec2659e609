"""Self-attention whose static KV cache holds rotated keys: RoPE once per key, not per step.

Megatron-core 0.16's ``Attention._adjust_key_value_for_inference`` stores the keys of a
static-batching inference context (``StaticInferenceContext``, the embedded engine's cache)
*before* RoPE and hands the whole rotary table ``[0, sequence_end)`` back to ``forward``,
which then rotates every cached key again at every decode step: at position ``p`` each layer
pays ``O(p)`` rotations (a cosine, a sine, two products, a half-rotation copy and a
concatenation of the whole cache) for one new query. Its flash-decode path (CUDA only)
already rotates keys before storing them; :class:`CachedRopeSelfAttention` does the same for
the plain path: the keys of this forward are rotated with their own positions' rows of the
table, stored, and the key rotation is dropped from what ``forward`` applies (the queries are
still rotated there).

Exact: RoPE acts on each key element alone (``k * cos + rotate_half(k) * sin`` with that
position's angles, Megatron's own ``apply_rotary_pos_emb``), so rotating a key when it is
stored gives bitwise the value that rotating it later would. Everything else (no inference
context: training; dynamic batching; flash decode; no RoPE) goes through Megatron's code
unchanged. Used by the local layer spec (:func:`megatron_dgrpo.models.provider.layer_spec`).
"""

from __future__ import annotations

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.utils import deprecate_inference_params


class CachedRopeSelfAttention(SelfAttention):
    """Megatron's ``SelfAttention``; with a static inference context, keys enter the KV cache
    already rotated (see the module docstring)."""

    def _adjust_key_value_for_inference(self, inference_context, query, key, value,
                                        rotary_pos_emb, rotary_pos_cos=None,
                                        rotary_pos_sin=None, rotary_pos_cos_sin=None,
                                        sequence_len_offset=None, *, inference_params=None):
        """Megatron's method (query/key/value ``[s, b, heads, d]``; returns query, key and
        value for the core attention, the rotary tables left to apply, the mask type and the
        block table); static batching with RoPE rotates ``key`` here and returns no key
        table, so the cache's keys are rotated exactly once."""
        context = deprecate_inference_params(inference_context, inference_params)
        args = (rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin, sequence_len_offset)
        rotate_here = (context is not None and context.is_static_batching()
                       and not self.config.flash_decode and rotary_pos_emb is not None
                       and rotary_pos_emb[1] is not None)
        if not rotate_here:
            return super()._adjust_key_value_for_inference(context, query, key, value,
                                                           rotary_pos_emb, *args)
        q_pos_emb, k_pos_emb = rotary_pos_emb
        start = context.sequence_len_offset
        key = apply_rotary_pos_emb(key, k_pos_emb[start:start + key.shape[0]], config=self.config,
                                   mscale=_yarn_get_concentration_factor_from_config(self.config),
                                   cp_group=self.pg_collection.cp)
        query, key, value, (q_pos_emb, _), mask_type, block_table = (
            super()._adjust_key_value_for_inference(context, query, key, value,
                                                    (q_pos_emb, k_pos_emb), *args))
        return query, key, value, (q_pos_emb, None), mask_type, block_table
