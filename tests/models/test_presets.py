"""Named presets load, validate, and carry the published Qwen3 sizes."""

from __future__ import annotations

import math

import pytest

from megatron_dgrpo.models import mapping
from megatron_dgrpo.models.config import ParallelConfig, validate_layout
from megatron_dgrpo.models.presets import get_preset, preset_names

# Model cards of Qwen/Qwen3-*: (total parameters, non-embedding parameters) in billions,
# as rounded there.
PUBLISHED_SIZES = {
    "qwen3-0.6b": (0.6, 0.44),
    "qwen3-1.7b": (1.7, 1.4),
    "qwen3-4b": (4.0, 3.6),
    "qwen3-8b": (8.2, 6.95),
    "qwen3-14b": (14.8, 13.2),
    "qwen3-32b": (32.8, 31.2),
}


def _parameter_counts(name: str) -> tuple[float, float]:
    shapes = mapping.hf_shapes(get_preset(name))
    total = sum(math.prod(shape) for shape in shapes.values())
    embeddings = sum(math.prod(shapes[n]) for n in ("model.embed_tokens.weight",
                                                    "lm_head.weight") if n in shapes)
    return total / 1e9, (total - embeddings) / 1e9


@pytest.mark.parametrize("name", sorted(PUBLISHED_SIZES))
def test_real_presets_have_the_published_parameter_counts(name):
    total, non_embedding = _parameter_counts(name)
    published_total, published_non_embedding = PUBLISHED_SIZES[name]
    decimals = len(str(published_non_embedding).split(".")[1])
    assert round(total, 1) == published_total
    assert round(non_embedding, decimals) == published_non_embedding


def test_every_preset_validates_and_real_ones_split_over_eight_gpus():
    assert set(PUBLISHED_SIZES) | {"tiny-qwen3", "small-qwen3"} == set(preset_names())
    for name in preset_names():
        config = get_preset(name)
        config.validate()
        if name in PUBLISHED_SIZES:
            validate_layout(config, ParallelConfig(tensor_parallel=8, pipeline_parallel=4))


def test_tiny_presets_run_on_vllm_cpu_and_can_teach_each_other():
    tiny, small = get_preset("tiny-qwen3"), get_preset("small-qwen3")
    assert tiny.head_dim >= 32 and small.head_dim >= 32
    assert tiny.vocab_size == small.vocab_size
    assert tiny.num_attention_heads > tiny.num_query_groups  # exercises GQA
    assert tiny.tie_word_embeddings and not small.tie_word_embeddings


def test_unknown_preset_lists_the_known_names():
    with pytest.raises(ValueError) as err:
        get_preset("qwen3-7b")
    assert "unknown model preset 'qwen3-7b'" in str(err.value)
    assert "qwen3-8b" in str(err.value) and "tiny-qwen3" in str(err.value)


def test_presets_are_independent_copies():
    get_preset("tiny-qwen3").num_layers = 99
    assert get_preset("tiny-qwen3").num_layers == 2
