"""Random Qwen3 models built locally with ``transformers`` (no hub access), for tests and the
quickstart."""

from __future__ import annotations

import os

import torch

from megatron_dgrpo.models.config import ModelConfig


def random_hf_qwen3(config: ModelConfig, seed: int = 0, weight_scale: float = 3.0):
    """An fp32 ``Qwen3ForCausalLM`` of ``config`` in eval mode, with default-initialised
    weights multiplied by ``weight_scale`` so next-token distributions are peaked (greedy
    choices are not near-ties)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**config.to_hf_config()))
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(weight_scale)
    return model.eval()


def write_random_qwen3(config: ModelConfig, hf_dir: str | os.PathLike,
                       megatron_dir: str | os.PathLike, seed: int = 0,
                       weight_scale: float = 3.0):
    """:func:`random_hf_qwen3` saved as the Hugging Face directory ``hf_dir`` and converted
    to the Megatron checkpoint ``megatron_dir`` (TP=1, PP=1); returns the model."""
    from megatron_dgrpo.models.convert import hf_to_megatron_checkpoint

    model = random_hf_qwen3(config, seed, weight_scale)
    model.save_pretrained(hf_dir)
    hf_to_megatron_checkpoint(hf_dir, megatron_dir)
    return model
