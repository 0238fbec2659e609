"""Named model sizes: the public Qwen3 dense models and tiny ones for tests and CPU runs.

Real sizes follow the Hugging Face ``config.json`` of ``Qwen/Qwen3-*``: vocabulary 151936,
head_dim 128, 8 key/value groups, RoPE base 1e6, RMSNorm eps 1e-6, 40960 positions, bf16;
embeddings tied up to 4B and untied from 8B. Tiny presets keep head_dim >= 32 so vLLM's CPU
attention backend runs them too, and share one vocabulary so either can teach the other.
"""

from __future__ import annotations

import dataclasses

from megatron_dgrpo.models.config import ModelConfig


def _qwen3(layers: int, hidden: int, ffn: int, heads: int, tied: bool) -> ModelConfig:
    return ModelConfig(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
                       num_attention_heads=heads, num_query_groups=8, head_dim=128,
                       vocab_size=151936, max_position_embeddings=40960, rope_base=1_000_000.0,
                       norm_eps=1e-6, tie_word_embeddings=tied, params_dtype="bf16")


_PRESETS: dict[str, ModelConfig] = {
    "qwen3-0.6b": _qwen3(layers=28, hidden=1024, ffn=3072, heads=16, tied=True),
    "qwen3-1.7b": _qwen3(layers=28, hidden=2048, ffn=6144, heads=16, tied=True),
    "qwen3-4b": _qwen3(layers=36, hidden=2560, ffn=9728, heads=32, tied=True),
    "qwen3-8b": _qwen3(layers=36, hidden=4096, ffn=12288, heads=32, tied=False),
    "qwen3-14b": _qwen3(layers=40, hidden=5120, ffn=17408, heads=40, tied=False),
    "qwen3-32b": _qwen3(layers=64, hidden=5120, ffn=25600, heads=64, tied=False),
    # Student for tests and the CPU quickstart (~0.2M parameters).
    "tiny-qwen3": ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=192,
                              num_attention_heads=4, num_query_groups=2, head_dim=32,
                              vocab_size=1024, max_position_embeddings=4096,
                              tie_word_embeddings=True),
    # Teacher for tests and the CPU quickstart: deeper and wider, untied embeddings.
    "small-qwen3": ModelConfig(num_layers=4, hidden_size=128, ffn_hidden_size=384,
                               num_attention_heads=4, num_query_groups=2, head_dim=32,
                               vocab_size=1024, max_position_embeddings=4096,
                               tie_word_embeddings=False),
}


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of the named preset; ValueError listing the known names otherwise."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: "
                         f"{', '.join(preset_names())}")
    return dataclasses.replace(_PRESETS[name])
