"""The refit bridge's trainer side at PP=2, PP=2 x VP=2 and TP=2, against the HF checkpoint
bit for bit.

Real gloo ranks load a Megatron checkpoint converted from a random HF directory, then
stream :func:`hf_weight_buckets` (no engine involved): global rank 0 must receive every HF
tensor exactly once, equal to the checkpoint's tensor bit for bit (pipeline stages other
than its own arrive point-to-point, TP shards are all-gathered), in buckets bounded by
``bucket_mb``; every other rank must yield nothing. With two virtual stages per rank (the
4 layers in 4 stages, rank 0 holding stages 0 and 2) the stream interleaves the ranks'
chunks; the model loads from a checkpoint written at PP=2, re-sharded on load.
"""

import json

import pytest
import torch

from megatron_dgrpo.models.config import ModelConfig
from megatron_dgrpo.models.mapping import hf_shapes
from megatron_dgrpo.parallel.launch import run_distributed

pytestmark = pytest.mark.multiproc

FUSED_PARTS = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})
BUCKET_MB = 0.02  # 20 kB: many buckets, parameters of one layer split across them
CONFIGS = {
    "tied": ModelConfig(num_layers=4, ffn_hidden_size=128),
    "untied": ModelConfig(num_layers=4, ffn_hidden_size=128, tie_word_embeddings=False,
                          vocab_size=1000),  # padded to 1024 in Megatron: padding dropped
}


def _write_random_hf(config: ModelConfig, directory, seed: int):
    from megatron_dgrpo.models.convert import write_hf_weights

    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf_config()))
    generator = torch.Generator().manual_seed(seed)
    write_hf_weights(directory, [(name, torch.randn(shape, generator=generator))
                                 for name, shape in hf_shapes(config).items()])
    return directory


# (TP, PP, VP), each on the same two ranks
LAYOUTS = {"pp2": (1, 2, 1), "pp2vp2": (1, 2, 2), "tp2": (2, 1, 1)}


def _stream_buckets(rank, world_size, checkpoints):
    """Each rank, for each layout and case: the buckets it yields from a model loaded from
    that layout's Megatron checkpoint."""
    from megatron_dgrpo.models.config import ParallelConfig
    from megatron_dgrpo.models.convert import (
        HFCheckpoint,
        load_megatron_checkpoint_into,
    )
    from megatron_dgrpo.models.provider import (
        build_stage_model,
        destroy_parallel,
        initialize_parallel,
    )
    from megatron_dgrpo.rollout.refit import hf_weight_buckets

    streamed = {}
    for layout, (tp, pp, vp) in LAYOUTS.items():
        parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp,
                                  virtual_pipeline_stages=vp)
        initialize_parallel(parallel, seed=1)
        for case, (hf_dir, ckpt_dir) in checkpoints[layout].items():
            config = HFCheckpoint(hf_dir).config
            model = build_stage_model(config, parallel)
            load_megatron_checkpoint_into(model, ckpt_dir)
            streamed[layout, case] = [
                [(name, tensor.clone()) for name, tensor in bucket]
                for bucket in hf_weight_buckets(model, config, bucket_mb=BUCKET_MB)]
        destroy_parallel()
    return streamed


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """(HF directory per case, per-rank results of :func:`_stream_buckets`)."""
    from megatron_dgrpo.models.convert import hf_to_megatron_checkpoint

    root = tmp_path_factory.mktemp("refit-buckets")
    hf_dirs = {case: _write_random_hf(config, root / case / "hf", seed)
               for seed, (case, config) in enumerate(CONFIGS.items())}
    checkpoints = {layout: {case: (str(hf_dir), str(hf_to_megatron_checkpoint(
        hf_dir, root / case / layout, tensor_parallel=tp, pipeline_parallel=pp)))
        for case, hf_dir in hf_dirs.items()} for layout, (tp, pp, _) in LAYOUTS.items()}
    return hf_dirs, run_distributed(_stream_buckets, 2, args=(checkpoints,))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_rank0_receives_every_hf_tensor_bit_for_bit(streamed, layout, case):
    from megatron_dgrpo.models.convert import HFCheckpoint

    hf_dirs, per_rank = streamed
    checkpoint = HFCheckpoint(hf_dirs[case])
    pairs = [pair for bucket in per_rank[0][layout, case] for pair in bucket]
    names = [name for name, _ in pairs]
    assert sorted(names) == sorted(hf_shapes(checkpoint.config)), "missing or extra tensors"
    assert len(set(names)) == len(names), "a tensor was sent twice"
    for name, tensor in pairs:
        expected = checkpoint.tensor(name)
        assert tensor.dtype == expected.dtype and tensor.shape == expected.shape, name
        assert torch.equal(tensor, expected), f"{name} differs from the HF checkpoint"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_buckets_are_bounded_and_only_rank0_yields(streamed, layout, case):
    _, per_rank = streamed
    buckets = per_rank[0][layout, case]
    assert len(buckets) > 8
    for bucket in buckets:
        nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
        assert len(bucket) == 1 or nbytes <= BUCKET_MB * 1e6 or _one_megatron_param(bucket)
    assert per_rank[1][layout, case] == []


def _one_megatron_param(bucket) -> bool:
    """True if the bucket is exactly the HF tensors of one fused Megatron parameter (q/k/v
    or gate/up of one layer), which may exceed the bound alone."""
    stems = {name.rsplit(".", 2)[0] for name, _ in bucket}
    leaves = {name.rsplit(".", 2)[1] for name, _ in bucket}
    return len(stems) == 1 and leaves in FUSED_PARTS
