"""Long context against transformers: YaRN rotary scaling, and context parallelism
(cp_comm_type=allgather on the local spec), on real gloo ranks.

Reference: transformers' Qwen3ForCausalLM on the whole sequence, with the same YaRN
``rope_parameters``. The sequence (200 tokens) runs well past the original 64 positions, so
the scaled frequencies and YaRN's attention factor both matter: plain RoPE on the same
weights is far off (checked, so the comparison cannot pass by accident).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hf_tiny_models import TEST_VOCAB, build_hf_model, save_hf_dir, tiny_config

from megatron_dgrpo.models import convert
from megatron_dgrpo.models.config import ModelConfig, ParallelConfig
from megatron_dgrpo.parallel.launch import run_distributed

SEQ = 200  # a multiple of 2 * CP (4) and > yarn_original_max_position_embeddings
LAYOUTS = [ParallelConfig(tensor_parallel=2),
           ParallelConfig(context_parallel=2, cp_comm_type="allgather")]


def _yarn_config() -> ModelConfig:
    return dataclasses.replace(tiny_config(False), max_position_embeddings=256, yarn_factor=4.0,
                               yarn_original_max_position_embeddings=64)


def _input_ids() -> torch.Tensor:
    return torch.randint(0, TEST_VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))


def _logits_per_layout(rank, world_size, checkpoint, config):
    """Full ``[b, s, vocab]`` logits of each layout (on every rank)."""
    from megatron.core import parallel_state as ps

    from megatron_dgrpo.models.convert import load_megatron_checkpoint_into
    from megatron_dgrpo.models.provider import (
        build_gpt_model,
        destroy_parallel,
        initialize_parallel,
    )
    from megatron_dgrpo.parallel.context import cp_all_gather, cp_shard

    results = []
    for parallel in LAYOUTS:
        initialize_parallel(parallel, seed=1)
        model = build_gpt_model(config, parallel).eval()
        load_megatron_checkpoint_into(model, checkpoint)
        tokens = _input_ids()
        positions = torch.arange(SEQ).expand_as(tokens)
        cp_rank, cp_size = ps.get_context_parallel_rank(), ps.get_context_parallel_world_size()
        if cp_size > 1:
            tokens, positions = cp_shard(tokens, cp_rank, cp_size), cp_shard(positions, cp_rank, cp_size)
        with torch.no_grad():
            logits = model(tokens, positions, None, runtime_gather_output=True)
        group = ps.get_context_parallel_group() if cp_size > 1 else None
        results.append(cp_all_gather(logits, group)[..., :config.vocab_size])
        destroy_parallel()
    return results


@pytest.mark.multiproc
def test_yarn_and_context_parallel_logits_match_transformers(tmp_path):
    config = _yarn_config()
    hf_model = build_hf_model(config, seed=9)
    plain = build_hf_model(dataclasses.replace(config, yarn_factor=None,
                                               yarn_original_max_position_embeddings=None), seed=9)
    with torch.no_grad():
        reference, plain_logits = hf_model(_input_ids()).logits, plain(_input_ids()).logits
    assert (plain_logits - reference).abs().max() > 0.1, "YaRN must change these logits"

    hf_dir = save_hf_dir(hf_model, tmp_path / "hf")
    checkpoint = convert.hf_to_megatron_checkpoint(hf_dir, tmp_path / "mcore", 1, 1)
    assert convert.MegatronCheckpoint(checkpoint).info.config == config
    for rank_results in run_distributed(_logits_per_layout, 2, args=(checkpoint, config)):
        for parallel, logits in zip(LAYOUTS, rank_results):
            diff = (logits - reference).abs().max().item()
            assert diff <= 1e-5, f"{parallel}: max |logit diff| {diff:.2e}"


def _greedy_from_embedded_engine(rank, world_size, checkpoint, config, prompts, new_tokens):
    from megatron_dgrpo.models.convert import load_megatron_checkpoint_into
    from megatron_dgrpo.models.provider import build_gpt_model, initialize_parallel
    from megatron_dgrpo.rollout.embedded import EmbeddedEngine
    from megatron_dgrpo.rollout.engine import SamplingParams

    initialize_parallel(ParallelConfig(), seed=1)
    model = build_gpt_model(config, ParallelConfig()).eval()
    load_megatron_checkpoint_into(model, checkpoint)
    batch = EmbeddedEngine(model, vocab_size=config.vocab_size).generate(
        prompts, SamplingParams(temperature=0.0, max_new_tokens=new_tokens))
    return [r.response_ids for r in batch.rollouts]


@pytest.mark.multiproc
def test_yarn_greedy_decoding_with_the_kv_cache_matches_transformers(tmp_path):
    """The embedded engine's cached decode (rotary tables sliced by offset) with YaRN:
    ragged prompts that end past the original 64 positions."""
    config = _yarn_config()
    hf_model = build_hf_model(config, seed=4)
    plain = build_hf_model(dataclasses.replace(config, yarn_factor=None,
                                               yarn_original_max_position_embeddings=None), seed=4)
    prompts = [_input_ids()[0, :70].tolist(), _input_ids()[1, :90].tolist()]

    def greedy(model):
        with torch.no_grad():
            return [model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
                    for prompt in prompts]

    expected = greedy(hf_model)
    assert expected != greedy(plain), "YaRN must change these continuations"
    checkpoint = convert.hf_to_megatron_checkpoint(save_hf_dir(hf_model, tmp_path / "hf"),
                                                   tmp_path / "mcore", 1, 1)
    got = run_distributed(_greedy_from_embedded_engine, 1,
                          args=(checkpoint, config, prompts, 8))[0]
    assert got == expected


@pytest.mark.parametrize("hf_rope, message", [
    ({"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "beta_fast": 16},
     "default beta_fast/beta_slow/attention scaling"),
    ({"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}, "rope scaling 'linear'"),
])
def test_unsupported_rope_scaling_is_refused(hf_rope, message):
    hf = {**tiny_config(False).to_hf_config(), "rope_parameters": hf_rope}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config(hf)


@pytest.mark.parametrize("changes, message", [
    ({"yarn_factor": 4.0}, "go together"),
    ({"yarn_factor": 1.0, "yarn_original_max_position_embeddings": 64}, "must be > 1"),
    ({"yarn_factor": 4.0, "yarn_original_max_position_embeddings": 8192},
     "must be in \\[1, max_position_embeddings"),
])
def test_bad_yarn_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(tiny_config(False), **changes).validate()
