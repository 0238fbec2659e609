"""HF <-> Megatron checkpoint conversion: exact round trips, exact re-sharding, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hf_tiny_models import (
    TEST_VOCAB,
    build_hf_model,
    read_json,
    save_hf_dir,
    tiny_config,
)
from safetensors.torch import load_file, save_file

from megatron_dgrpo.models import convert
from megatron_dgrpo.models.convert import CheckpointError, shard_dir_name


def _hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _megatron_files(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(f.relative_to(ckpt)): load_file(f) for f in sorted(ckpt.rglob("*.safetensors"))}


def _assert_same_tensors(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]):
    assert sorted(ours) == sorted(reference)
    for name, tensor in reference.items():
        assert ours[name].dtype == tensor.dtype, name
        assert torch.equal(ours[name], tensor), name


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 2)])
def test_hf_to_megatron_to_hf_is_bitwise(hf_dirs, tmp_path, tied, tp, pp):
    hf_dir = hf_dirs[tied]
    ckpt = convert.hf_to_megatron_checkpoint(hf_dir, tmp_path / "mcore", tp, pp)
    back = convert.megatron_to_hf_checkpoint(ckpt, tmp_path / "hf_back", max_shard_bytes=100_000)

    _assert_same_tensors(_hf_tensors(back), _hf_tensors(hf_dir))
    assert read_json(back / "config.json") == read_json(hf_dir / "config.json")
    assert read_json(back / "generation_config.json") == read_json(hf_dir / "generation_config.json")
    index = read_json(back / convert.HF_INDEX_FILE)
    assert set(index["weight_map"].values()) == {f.name for f in back.glob("*.safetensors")}
    meta = read_json(ckpt / convert.METADATA_FILE)
    assert (meta["tensor_parallel"], meta["pipeline_parallel"]) == (tp, pp)
    assert meta["padded_vocab_size"] == 1024 and meta["model"]["vocab_size"] == TEST_VOCAB


def test_converted_hf_dir_loads_in_transformers(hf_dirs, tmp_path):
    from transformers import Qwen3ForCausalLM

    ckpt = convert.hf_to_megatron_checkpoint(hf_dirs[False], tmp_path / "mcore", 2, 1)
    back = convert.megatron_to_hf_checkpoint(ckpt, tmp_path / "hf_back")
    assert (back / convert.HF_SINGLE_FILE).is_file()  # small enough for one file
    loaded = Qwen3ForCausalLM.from_pretrained(back).state_dict()
    _assert_same_tensors({k: loaded[k] for k in _hf_tensors(hf_dirs[False])},
                         _hf_tensors(hf_dirs[False]))


def test_bf16_single_file_checkpoint_round_trips(tmp_path):
    model = build_hf_model(tiny_config(tied=True), seed=3).to(torch.bfloat16)
    hf_dir = save_hf_dir(model, tmp_path / "hf", max_shard_size=None)
    assert (hf_dir / convert.HF_SINGLE_FILE).is_file()
    ckpt = convert.hf_to_megatron_checkpoint(hf_dir, tmp_path / "mcore", 2, 2)
    assert read_json(ckpt / convert.METADATA_FILE)["model"]["params_dtype"] == "bf16"
    back = convert.megatron_to_hf_checkpoint(ckpt, tmp_path / "hf_back")
    _assert_same_tensors(_hf_tensors(back), _hf_tensors(hf_dir))


def test_tensor_parallel_shards_are_slices_of_the_hf_tensors(hf_dirs, tmp_path):
    hf = _hf_tensors(hf_dirs[False])
    ckpt = convert.hf_to_megatron_checkpoint(hf_dirs[False], tmp_path / "mcore", 2, 2)
    rank1_stage1 = load_file(ckpt / shard_dir_name(1, 1) / "model.safetensors")
    layer = "model.layers.1."  # global layer 1 is local layer 0 of stage 1
    o_proj, down = hf[layer + "self_attn.o_proj.weight"], hf[layer + "mlp.down_proj.weight"]
    assert torch.equal(rank1_stage1["decoder.layers.0.self_attention.linear_proj.weight"],
                       o_proj[:, 64:])
    assert torch.equal(rank1_stage1["decoder.layers.0.mlp.linear_fc2.weight"], down[:, 96:])
    # rank 1 owns query group 1: q heads 2-3, k head 1, v head 1 (head_dim 32)
    expected_qkv = torch.cat([hf[layer + "self_attn.q_proj.weight"][64:128],
                              hf[layer + "self_attn.k_proj.weight"][32:64],
                              hf[layer + "self_attn.v_proj.weight"][32:64]])
    assert torch.equal(rank1_stage1["decoder.layers.0.self_attention.linear_qkv.weight"],
                       expected_qkv)
    expected_fc1 = torch.cat([hf[layer + "mlp.gate_proj.weight"][96:],
                              hf[layer + "mlp.up_proj.weight"][96:]])
    assert torch.equal(rank1_stage1["decoder.layers.0.mlp.linear_fc1.weight"], expected_fc1)
    # vocab 1000 padded to 1024: rank 1 holds rows 512..999 and 24 zero rows
    output = rank1_stage1["output_layer.weight"]
    assert torch.equal(output[:488], hf["lm_head.weight"][512:])
    assert torch.count_nonzero(output[488:]) == 0
    assert "embedding.word_embeddings.weight" not in rank1_stage1


@pytest.mark.parametrize("tied", [True, False])
def test_resharding_is_exact_in_both_directions(hf_dirs, tmp_path, tied):
    hf_dir = hf_dirs[tied]
    direct_tp1 = convert.hf_to_megatron_checkpoint(hf_dir, tmp_path / "tp1", 1, 1)
    direct_tp2pp2 = convert.hf_to_megatron_checkpoint(hf_dir, tmp_path / "tp2pp2", 2, 2)
    down = convert.reshard_megatron_checkpoint(direct_tp2pp2, tmp_path / "down", 1, 1)
    up = convert.reshard_megatron_checkpoint(direct_tp1, tmp_path / "up", 2, 2)
    tp2_only = convert.reshard_megatron_checkpoint(direct_tp2pp2, tmp_path / "tp2", 2, 1)

    for ours, reference in ((down, direct_tp1), (up, direct_tp2pp2)):
        ours_files, reference_files = _megatron_files(ours), _megatron_files(reference)
        assert sorted(ours_files) == sorted(reference_files)
        for name in reference_files:
            _assert_same_tensors(ours_files[name], reference_files[name])
        assert read_json(ours / convert.METADATA_FILE) == read_json(reference / convert.METADATA_FILE)
    back = convert.megatron_to_hf_checkpoint(tp2_only, tmp_path / "hf_back")
    _assert_same_tensors(_hf_tensors(back), _hf_tensors(hf_dir))


# ---------------------------------------------------------------------------------------
# Bad input: a clear error, and nothing left in the output's parent directory


def _single_file_hf_dir(tmp_path: Path, edit_config=None, edit_tensors=None) -> Path:
    model = build_hf_model(tiny_config(tied=False), seed=5)
    hf_dir = save_hf_dir(model, tmp_path / "hf_input", max_shard_size=None)
    if edit_config:
        config = read_json(hf_dir / "config.json")
        edit_config(config)
        (hf_dir / "config.json").write_text(json.dumps(config))
    if edit_tensors:
        weights = hf_dir / convert.HF_SINGLE_FILE
        tensors = load_file(weights)
        edit_tensors(tensors)
        save_file(tensors, weights)
    return hf_dir


def _assert_fails_cleanly(convert_call, out: Path, error_type, *fragments: str):
    out.parent.mkdir(parents=True, exist_ok=True)
    before = sorted(os.listdir(out.parent))
    with pytest.raises(error_type) as err:
        convert_call()
    for fragment in fragments:
        assert fragment in str(err.value)
    assert sorted(os.listdir(out.parent)) == before


def _set(key, value):
    return lambda config: config.__setitem__(key, value)


@pytest.mark.parametrize("edit_config, edit_tensors, error_type, fragments", [
    (None, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), CheckpointError,
     ["missing 1 tensor(s): model.layers.1.mlp.up_proj.weight"]),
    (_set("intermediate_size", 96), None, CheckpointError,
     ["shape mismatch", "(192, 64) (expected (96, 64))"]),
    (None, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.weight", torch.zeros(64, 64)),
     CheckpointError, ["model.layers.0.self_attn.q_proj.weight (64, 64) (expected (128, 64))"]),
    (_set("model_type", "llama"), None, ValueError,
     ["unsupported architecture", "model_type='llama'", "supported: qwen3"]),
    (lambda c: c.pop("num_key_value_heads"), None, ValueError,
     ["missing required field(s): num_key_value_heads"]),
    (None, lambda t: t.__setitem__("model.layers.0.self_attn.rotary.weight", torch.zeros(2)),
     CheckpointError, ["does not know: model.layers.0.self_attn.rotary.weight"]),
])
def test_bad_hf_input_is_refused_before_writing(tmp_path, edit_config, edit_tensors,
                                                error_type, fragments):
    hf_dir = _single_file_hf_dir(tmp_path, edit_config, edit_tensors)
    out = tmp_path / "outputs" / "mcore"
    _assert_fails_cleanly(lambda: convert.hf_to_megatron_checkpoint(hf_dir, out, 2, 1),
                          out, error_type, *fragments)


def test_layout_that_does_not_divide_the_model_is_refused(hf_dirs, tmp_path):
    out = tmp_path / "outputs" / "mcore"
    _assert_fails_cleanly(lambda: convert.hf_to_megatron_checkpoint(hf_dirs[True], out, 3, 1),
                          out, ValueError, "num_attention_heads (4) is not divisible by "
                          "parallel.tensor_parallel (3)")


def test_pickle_only_and_missing_inputs_are_refused(tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(tiny_config(True).to_hf_config()))
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    out = tmp_path / "outputs" / "mcore"
    _assert_fails_cleanly(lambda: convert.hf_to_megatron_checkpoint(pickled, out),
                          out, CheckpointError, "only safetensors weights are read")
    _assert_fails_cleanly(lambda: convert.hf_to_megatron_checkpoint(tmp_path / "nope", out),
                          out, FileNotFoundError, "not found")
    _assert_fails_cleanly(lambda: convert.megatron_to_hf_checkpoint(pickled, out),
                          out, FileNotFoundError, "not a megatron-dgrpo checkpoint")


def test_existing_output_directory_is_an_error_and_left_untouched(hf_dirs, tmp_path):
    out = tmp_path / "outputs" / "mcore"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    _assert_fails_cleanly(lambda: convert.hf_to_megatron_checkpoint(hf_dirs[True], out),
                          out, FileExistsError, "already exists")
    assert os.listdir(out) == ["keep.txt"]


def test_failure_while_writing_leaves_nothing_behind(hf_dirs, tmp_path):
    ckpt = convert.hf_to_megatron_checkpoint(hf_dirs[True], tmp_path / "mcore", 1, 2)
    os.remove(ckpt / shard_dir_name(0, 1) / "model.safetensors")  # stage 0 converts first
    out = tmp_path / "outputs" / "hf"
    _assert_fails_cleanly(lambda: convert.megatron_to_hf_checkpoint(ckpt, out), out,
                          CheckpointError, "mp_rank_00_001/model.safetensors is missing")
    _assert_fails_cleanly(lambda: convert.reshard_megatron_checkpoint(ckpt, out, 2, 1), out,
                          CheckpointError, "mp_rank_00_001/model.safetensors is missing")


def test_megatron_shard_with_wrong_shape_is_refused(hf_dirs, tmp_path):
    ckpt = convert.hf_to_megatron_checkpoint(hf_dirs[True], tmp_path / "mcore", 2, 1)
    shard_file = ckpt / shard_dir_name(1, 0) / "model.safetensors"
    tensors = load_file(shard_file)
    tensors["decoder.layers.1.mlp.linear_fc2.weight"] = torch.zeros(64, 95)
    save_file(tensors, shard_file)
    out = tmp_path / "outputs" / "hf"
    _assert_fails_cleanly(lambda: convert.megatron_to_hf_checkpoint(ckpt, out), out,
                          CheckpointError, "decoder.layers.1.mlp.linear_fc2.weight has shape "
                          "(64, 95), expected (64, 96)")
