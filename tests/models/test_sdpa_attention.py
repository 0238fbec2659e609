"""SDPACoreAttention (the local spec's core attention) against Megatron's own
DotProductAttention: outputs and input gradients in float64, for causal training shapes with
grouped-query attention, explicit padding masks, single-token decode and queries that are
the last positions of longer keys; packed sequences (THD) against Megatron's attention on
each sequence alone; unsupported configurations are refused by name."""

import dataclasses

import pytest
import torch

from megatron_dgrpo.models.config import ModelConfig, ParallelConfig
from megatron_dgrpo.parallel.launch import run_distributed

MODEL = ModelConfig(num_layers=1, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4,
                    num_query_groups=2, head_dim=32, vocab_size=64, max_position_embeddings=64)


def _attention_pair(config, mask_type):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_dgrpo.models.sdpa_attention import SDPACoreAttention

    return tuple(cls(config, layer_number=1, attn_mask_type=mask_type, attention_type="self")
                 for cls in (DotProductAttention, SDPACoreAttention))


def _inputs(sq, sk, batch, generator):
    heads, groups, dim = MODEL.num_attention_heads, MODEL.num_query_groups, MODEL.head_dim
    shapes = ((sq, batch, heads, dim), (sk, batch, groups, dim), (sk, batch, groups, dim))
    return [torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()
            for shape in shapes]


def _compare(megatron_attention, sdpa_attention, inputs, mask, mask_type):
    results = []
    for module in (megatron_attention, sdpa_attention):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = module(*leaves, mask, attn_mask_type=mask_type)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append((out.detach(), [leaf.grad for leaf in leaves]))
    (expected, expected_grads), (got, got_grads) = results
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def _check(rank, world_size):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_dgrpo.models.provider import initialize_parallel, transformer_config

    initialize_parallel(ParallelConfig(), seed=1)
    config = transformer_config(MODEL, ParallelConfig())
    generator = torch.Generator().manual_seed(0)
    causal, no_mask = AttnMaskType.causal, AttnMaskType.no_mask
    pair = _attention_pair(config, causal)

    # Training: causal, sq == sk, two query heads per key group.
    _compare(*pair, _inputs(9, 9, 3, generator), None, causal)
    # Single-token decode over a cache of 7 keys (Megatron switches the mask off there).
    _compare(*pair, _inputs(1, 7, 3, generator), None, no_mask)
    # Left-padded rows: key padding + causal, every query also sees itself (Megatron's
    # convention: True = masked out).
    pads = torch.tensor([0, 2, 5])
    key_is_pad = torch.arange(8)[None, :] < pads[:, None]                      # [b, sk]
    future = torch.ones(8, 8, dtype=torch.bool).triu(1)                        # [sq, sk]
    masked = (key_is_pad[:, None, None, :] | future) & ~torch.eye(8, dtype=torch.bool)
    _compare(*pair, _inputs(8, 8, 3, generator), masked, causal)
    # Queries = the last 3 of 8 positions (chunked prefill): SDPA builds the bottom-right
    # causal mask itself; Megatron is given it explicitly.
    bottom_right = torch.ones(3, 8, dtype=torch.bool).tril(5).logical_not()
    inputs = _inputs(3, 8, 2, generator)
    megatron_out = pair[0](*inputs, bottom_right[None, None], attn_mask_type=causal)
    torch.testing.assert_close(pair[1](*inputs, None, attn_mask_type=causal), megatron_out,
                               rtol=1e-10, atol=1e-10)

    _check_packed(pair, generator)

    dropout_config = dataclasses.replace(config, attention_dropout=0.1)
    with pytest.raises(ValueError, match="attention dropout.*Transformer Engine"):
        _attention_pair(dropout_config, causal)
    return True


def _check_packed(pair, generator):
    """Three sequences (5, 3, 4 tokens) packed back to back, each padded to a multiple of 2
    (THD: [t, heads, d]): every real token's output and the gradients = Megatron's
    DotProductAttention on that sequence alone; padding gets and gives no gradient."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_dgrpo.models.forward import thd_params

    megatron_attention, sdpa_attention = pair
    lengths, starts = [5, 3, 4], [0, 6, 10]
    total = 14
    real = torch.zeros(total, dtype=torch.bool)
    for start, length in zip(starts, lengths):
        real[start:start + length] = True
    packed = thd_params(torch.tensor([0, 5, 8, 12], dtype=torch.int32),
                        torch.tensor([0, 6, 10, 14], dtype=torch.int32))
    inputs = [t[:, 0] for t in _inputs(total, total, 1, generator)]   # [t, heads or groups, d]
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    weights = torch.linspace(-1, 1, total * MODEL.num_attention_heads * MODEL.head_dim,
                             dtype=torch.float64).view(total, -1) * real[:, None]
    out = sdpa_attention(*leaves, None, attn_mask_type=AttnMaskType.causal,
                         packed_seq_params=packed)
    assert out.shape == (total, MODEL.num_attention_heads * MODEL.head_dim)
    (out * weights).sum().backward()
    for start, length in zip(starts, lengths):
        piece = [t.detach()[start:start + length, None].clone().requires_grad_() for t in inputs]
        expected = megatron_attention(*piece, None, attn_mask_type=AttnMaskType.causal)[:, 0]
        (expected * weights[start:start + length]).sum().backward()
        torch.testing.assert_close(out[start:start + length], expected, rtol=1e-10, atol=1e-10)
        for leaf, reference in zip(leaves, piece):
            torch.testing.assert_close(leaf.grad[start:start + length], reference.grad[:, 0],
                                       rtol=1e-10, atol=1e-10)
    for leaf in leaves:
        assert torch.count_nonzero(leaf.grad[~real]) == 0
    with pytest.raises(ValueError, match="must cover all of them"):
        sdpa_attention(*(t[:12] for t in inputs), None, attn_mask_type=AttnMaskType.causal,
                       packed_seq_params=packed)


def test_sdpa_core_attention_matches_megatron_dot_product_attention():
    assert run_distributed(_check, 1) == [True]


def _check_packed_context_parallel(rank, world_size):
    """Packed sequences (5, 3, 4 tokens, each padded to a multiple of 2 x CP = 4) over two CP
    ranks: rank r holds chunks r and 3 - r of every sequence. Each rank's outputs and input
    gradients = its chunks of Megatron's DotProductAttention (CP=1) on each sequence alone."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_dgrpo.models.forward import thd_params
    from megatron_dgrpo.models.provider import initialize_parallel, transformer_config
    from megatron_dgrpo.models.sdpa_attention import SDPACoreAttention
    from megatron_dgrpo.parallel.context import cp_shard_segments

    parallel = ParallelConfig(context_parallel=2, cp_comm_type="allgather")
    initialize_parallel(parallel, seed=1)
    causal = AttnMaskType.causal
    sdpa_attention = SDPACoreAttention(transformer_config(MODEL, parallel), layer_number=1,
                                       attn_mask_type=causal, attention_type="self")
    megatron_attention = _attention_pair(transformer_config(MODEL, ParallelConfig()), causal)[0]
    lengths, offsets = [5, 3, 4], [0, 8, 12, 16]
    total = offsets[-1]
    real = torch.zeros(total, dtype=torch.bool)
    for start, length in zip(offsets, lengths):
        real[start:start + length] = True
    packed = thd_params(torch.tensor([0, 5, 8, 12], dtype=torch.int32),
                        torch.tensor(offsets, dtype=torch.int32))
    generator = torch.Generator().manual_seed(3)  # the same inputs on both ranks
    inputs = [t[:, 0].detach() for t in _inputs(total, total, 1, generator)]
    weights = torch.linspace(-1, 1, total * MODEL.num_attention_heads * MODEL.head_dim,
                             dtype=torch.float64).view(total, -1) * real[:, None]

    def mine(tensor):  # this rank's THD shard: sequence i's chunks `rank` and `3 - rank`
        return cp_shard_segments(tensor, offsets, rank, 2, seq_dim=0)

    leaves = [mine(t).clone().requires_grad_() for t in inputs]
    out = sdpa_attention(*leaves, None, attn_mask_type=causal, packed_seq_params=packed)
    (out * mine(weights)).sum().backward()

    expected = torch.zeros(total, weights.shape[1], dtype=torch.float64)
    expected_grads = [torch.zeros_like(t) for t in inputs]
    for start, stop in zip(offsets[:-1], offsets[1:]):
        piece = [t[start:stop, None].clone().requires_grad_() for t in inputs]
        result = megatron_attention(*piece, None, attn_mask_type=causal)[:, 0]
        (result * weights[start:stop]).sum().backward()
        expected[start:stop] = result.detach()
        for grad, leaf in zip(expected_grads, piece):
            grad[start:stop] = leaf.grad[:, 0]
    torch.testing.assert_close(out.detach(), mine(expected), rtol=1e-10, atol=1e-10)
    for leaf, grad in zip(leaves, expected_grads):
        torch.testing.assert_close(leaf.grad, mine(grad), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="multiple of 2 \\* CP = 4"):
        uneven = thd_params(torch.tensor([0, 5, 8], dtype=torch.int32),
                            torch.tensor([0, 6, 8], dtype=torch.int32))
        sdpa_attention(*(t[:4] for t in leaves), None, attn_mask_type=causal,
                       packed_seq_params=uneven)
    return True


@pytest.mark.multiproc
def test_packed_attention_with_context_parallelism_equals_each_sequence_alone():
    assert run_distributed(_check_packed_context_parallel, 2) == [True, True]
