"""The Qwen3 parameter table: Megatron layouts checked against hand-written expectations."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_dgrpo.models import mapping
from megatron_dgrpo.models.config import ModelConfig
from megatron_dgrpo.models.mapping import TPSplit

# 4 query heads in 2 groups, head_dim 2, hidden 3: small enough to spell out every row.
SMALL = dataclasses.replace(ModelConfig(), hidden_size=3, ffn_hidden_size=4,
                            num_attention_heads=4, num_query_groups=2, head_dim=2,
                            num_layers=4, vocab_size=5)


def _labelled(first_label: int, rows: int, hidden: int = 3) -> torch.Tensor:
    """[rows, hidden] whose row i is filled with first_label + i."""
    return (torch.arange(rows, dtype=torch.float32) + first_label)[:, None].repeat(1, hidden)


def _param(config: ModelConfig, global_name: str, pipeline_parallel: int = 1):
    (param,) = [p for p in mapping.all_params(config, pipeline_parallel)
                if p.global_name == global_name]
    return param


def test_qkv_is_interleaved_per_query_group():
    q, k, v = _labelled(100, 8), _labelled(200, 4), _labelled(300, 4)
    qkv_param = _param(SMALL, "decoder.layers.0.self_attention.linear_qkv.weight")
    fused = mapping.hf_to_megatron(qkv_param, [q, k, v], SMALL)
    group0 = [100, 101, 102, 103, 200, 201, 300, 301]   # q heads 0-1, k_0, v_0
    group1 = [104, 105, 106, 107, 202, 203, 302, 303]   # q heads 2-3, k_1, v_1
    assert fused[:, 0].tolist() == group0 + group1
    back = dict(mapping.megatron_to_hf(qkv_param, fused, SMALL))
    assert torch.equal(back["model.layers.0.self_attn.q_proj.weight"], q)
    assert torch.equal(back["model.layers.0.self_attn.k_proj.weight"], k)
    assert torch.equal(back["model.layers.0.self_attn.v_proj.weight"], v)
    # TP=2: each rank gets whole query groups.
    rank0, rank1 = mapping.split_for_tp(TPSplit.COLUMN, fused, 2)
    assert rank0[:, 0].tolist() == group0 and rank1[:, 0].tolist() == group1


def test_gate_and_up_are_stacked_per_tensor_parallel_rank():
    gate, up = _labelled(10, 4), _labelled(20, 4)
    fc1 = _param(SMALL, "decoder.layers.0.mlp.linear_fc1.weight")
    full = mapping.hf_to_megatron(fc1, [gate, up], SMALL)
    assert full[:, 0].tolist() == [10, 11, 12, 13, 20, 21, 22, 23]
    rank0, rank1 = mapping.split_for_tp(TPSplit.GATED_COLUMN, full, 2)
    assert rank0[:, 0].tolist() == [10, 11, 20, 21]
    assert rank1[:, 0].tolist() == [12, 13, 22, 23]
    assert torch.equal(mapping.merge_tp_shards(TPSplit.GATED_COLUMN, [rank0, rank1]), full)


def test_vocab_rows_are_zero_padded_then_split_and_the_padding_dropped_on_merge():
    embedding = _labelled(1, 5)                  # vocab 5 -> padded 8 at TP=2
    rank0, rank1 = mapping.split_for_tp(TPSplit.VOCAB, embedding, 2, padded_vocab_size=8)
    assert rank0[:, 0].tolist() == [1, 2, 3, 4]
    assert rank1[:, 0].tolist() == [5, 0, 0, 0]
    merged = mapping.merge_tp_shards(TPSplit.VOCAB, [rank0, rank1], vocab_size=5)
    assert torch.equal(merged, embedding)


def test_row_parallel_splits_input_features_and_replicated_must_agree():
    proj = torch.arange(12.0).reshape(3, 4)
    rank0, rank1 = mapping.split_for_tp(TPSplit.ROW, proj, 2)
    assert torch.equal(rank0, proj[:, :2]) and torch.equal(rank1, proj[:, 2:])
    assert torch.equal(mapping.merge_tp_shards(TPSplit.ROW, [rank0, rank1]), proj)
    with pytest.raises(ValueError, match="replicated tensor differs"):
        mapping.merge_tp_shards(TPSplit.REPLICATED, [torch.zeros(3), torch.ones(3)])


def test_stage_params_place_layers_embeddings_and_tied_output_layer():
    tied = dataclasses.replace(SMALL, tie_word_embeddings=True)
    first, last = (mapping.stage_params(tied, r, 2) for r in range(2))
    assert first[0].local_name == "embedding.word_embeddings.weight"
    assert {p.layer for p in first if p.layer is not None} == {0, 1}
    assert {p.layer for p in last if p.layer is not None} == {2, 3}
    layer3_fc2 = [p for p in last if p.global_name == "decoder.layers.3.mlp.linear_fc2.weight"]
    assert layer3_fc2[0].local_name == "decoder.layers.1.mlp.linear_fc2.weight"
    # Tied at PP=2: the last stage holds a copy of the embedding that is not exported again.
    output = [p for p in last if p.local_name == "output_layer.weight"]
    assert mapping.hf_names(output[0]) == ("model.embed_tokens.weight",)
    assert not output[0].rule.exported
    # Tied at PP=1: no separate output layer; untied: lm_head.
    assert "output_layer.weight" not in {p.local_name for p in mapping.stage_params(tied, 0, 1)}
    untied = dataclasses.replace(SMALL, tie_word_embeddings=False)
    (head,) = [p for p in mapping.stage_params(untied, 0, 1) if p.local_name == "output_layer.weight"]
    assert mapping.hf_names(head) == ("lm_head.weight",)


def test_local_names_get_the_stage_layer_offset():
    name = "decoder.layers.1.mlp.linear_fc1.weight"
    assert mapping.local_to_global_name(name, 1, SMALL, 2) == "decoder.layers.3.mlp.linear_fc1.weight"
    assert mapping.local_to_global_name("output_layer.weight", 1, SMALL, 2) == "output_layer.weight"


def test_transformer_engine_names_fuse_the_layer_norms():
    arch = mapping.get_mapping("qwen3")
    local = "decoder.layers.3.input_layernorm.weight"
    te = "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    assert mapping.to_te_name(local, arch) == te
    assert mapping.from_te_name(te, arch) == local
    assert mapping.from_te_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", arch) == \
        "decoder.layers.0.pre_mlp_layernorm.weight"
    assert mapping.to_te_name("decoder.final_layernorm.weight", arch) == \
        "decoder.final_layernorm.weight"


def test_shard_shapes_follow_the_split_axis():
    def shape(name):
        return mapping.shard_shape(_param(SMALL, name), SMALL, 2)

    assert shape("embedding.word_embeddings.weight") == (128, 3)   # padded 256 / 2
    assert shape("decoder.layers.0.self_attention.linear_qkv.weight") == (8, 3)
    assert shape("decoder.layers.0.self_attention.linear_proj.weight") == (3, 4)
    assert shape("decoder.layers.0.mlp.linear_fc1.weight") == (4, 3)
    assert shape("decoder.layers.0.self_attention.q_layernorm.weight") == (2,)


def test_hf_tensor_check_reports_missing_unexpected_and_misshaped():
    shapes = mapping.hf_shapes(SMALL)
    without = {k: v for k, v in shapes.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match="missing 1 tensor.*model.norm.weight"):
        mapping.check_hf_tensors(SMALL, without)
    with pytest.raises(ValueError, match="does not know: model.extra"):
        mapping.check_hf_tensors(SMALL, {**shapes, "model.extra": (1,)})
    with pytest.raises(ValueError, match=r"model.norm.weight \(4,\) \(expected \(3,\)\)"):
        mapping.check_hf_tensors(SMALL, {**shapes, "model.norm.weight": (4,)})


def test_unknown_architecture_has_no_mapping():
    with pytest.raises(ValueError, match="no parameter mapping for architecture 'llama'"):
        mapping.get_mapping("llama")


@settings(max_examples=60, deadline=None)
@given(split=st.sampled_from(list(TPSplit)), tp=st.sampled_from([1, 2, 4, 8]),
       rows_per_rank=st.integers(1, 3), cols_per_rank=st.integers(1, 3),
       padding=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_split_then_merge_is_the_identity(split, tp, rows_per_rank, cols_per_rank, padding,
                                          seed):
    rows, cols = 2 * tp * rows_per_rank, tp * cols_per_rank   # divisible for every split
    full = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    padded = -(-(rows + padding) // tp) * tp if split is TPSplit.VOCAB else None
    shards = mapping.split_for_tp(split, full, tp, padded)
    assert len(shards) == tp
    assert len({tuple(s.shape) for s in shards}) == 1
    assert all(s.is_contiguous() for s in shards)
    assert torch.equal(mapping.merge_tp_shards(split, shards, vocab_size=rows), full)
