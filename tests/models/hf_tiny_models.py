"""Tiny random Qwen3 models built locally with transformers (no hub access), for the tests."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from megatron_dgrpo.models.config import ModelConfig
from megatron_dgrpo.models.presets import get_preset

# 1000 is not a multiple of 128, so every conversion exercises vocabulary padding.
TEST_VOCAB = 1000


def tiny_config(tied: bool) -> ModelConfig:
    """tiny-qwen3 (GQA: 4 heads, 2 groups, head_dim 32) with a vocabulary that needs padding."""
    return dataclasses.replace(get_preset("tiny-qwen3"), vocab_size=TEST_VOCAB,
                               tie_word_embeddings=tied)


def build_hf_model(config: ModelConfig, seed: int):
    """A transformers Qwen3ForCausalLM with every weight random (norms around 1), fp32, eval."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**config.to_hf_config())).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.1 * noise)
    return model


def save_hf_dir(model, path: Path, max_shard_size: str | None = "150KB") -> Path:
    """save_pretrained (sharded with an index when ``max_shard_size`` is set)."""
    if max_shard_size:
        model.save_pretrained(path, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(path)
    return path


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
