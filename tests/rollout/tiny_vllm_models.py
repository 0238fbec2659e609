"""A tiny random Qwen3 Hugging Face checkpoint for the vLLM tests (built locally)."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_dgrpo.models.config import ModelConfig

# Prompts of different lengths (token ids below the tiny vocabulary of 1024).
PROMPTS = [[5, 17, 99, 3], [42, 8], [7, 7, 7, 100, 200, 300]]


def write_tiny_qwen3(directory: Path, head_dim: int = 32, seed: int = 0) -> Path:
    """Save a float32 Qwen3 (hidden 64, 4 heads, 2 groups, ffn 128, tied embeddings) whose
    weights have std 0.2, so next-token distributions are peaked and greedy choices clear.
    ffn 128 makes each TP=2 shard of ``down_proj`` square ([64, 64])."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = ModelConfig(head_dim=head_dim, ffn_hidden_size=128)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**config.to_hf_config(), initializer_range=0.2))
    model.save_pretrained(directory)
    return Path(directory)
