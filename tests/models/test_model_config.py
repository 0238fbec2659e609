"""ModelConfig / ParallelConfig validation and the Hugging Face config.json round trip."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_dgrpo.models.config import (
    ModelConfig,
    ParallelConfig,
    Runtime,
    TransformerFp8Config,
    validate_layout,
)

CPU = Runtime(cuda=False, transformer_engine=False)
GPU_WITH_TE = Runtime(cuda=True, transformer_engine=True)
GPU_WITHOUT_TE = Runtime(cuda=True, transformer_engine=False)


@pytest.mark.parametrize("model_changes, parallel_changes, message", [
    ({"num_attention_heads": 6, "num_query_groups": 2}, {"tensor_parallel": 4},
     "num_attention_heads (6) is not divisible by parallel.tensor_parallel (4)"),
    ({"num_query_groups": 2}, {"tensor_parallel": 4},
     "num_query_groups (2) is not divisible by parallel.tensor_parallel (4)"),
    ({"num_layers": 3}, {"pipeline_parallel": 2},
     "num_layers (3) is not divisible by parallel.pipeline_parallel (2)"),
    ({"ffn_hidden_size": 190}, {"tensor_parallel": 4}, "ffn_hidden_size (190)"),
    ({"num_layers": 6}, {"pipeline_parallel": 2, "virtual_pipeline_stages": 2},
     "num_layers (6) is not divisible by parallel.pipeline_parallel x virtual_pipeline_stages "
     "(2 x 2)"),
])
def test_layout_errors_name_the_offending_sizes(model_changes, parallel_changes, message):
    base = {"num_attention_heads": 8, "num_query_groups": 4}
    model = dataclasses.replace(ModelConfig(), **{**base, **model_changes})
    with pytest.raises(ValueError) as err:
        validate_layout(model, ParallelConfig(**parallel_changes))
    assert message in str(err.value)


def test_layout_that_divides_evenly_is_accepted():
    model = dataclasses.replace(ModelConfig(), num_attention_heads=8, num_query_groups=4,
                                num_layers=4)
    validate_layout(model, ParallelConfig(tensor_parallel=4, pipeline_parallel=4))


@pytest.mark.parametrize("parallel, message", [
    (ParallelConfig(tensor_parallel=2, context_parallel=2),
     ("context parallelism with cp_comm_type=p2p needs Transformer Engine on CUDA; this "
      "machine has no CUDA and no Transformer Engine; parallel.cp_comm_type=allgather runs "
      "context parallelism without it")),
    (ParallelConfig(context_parallel=2, cp_comm_type="ring"),
     "parallel.cp_comm_type must be one of p2p, a2a, a2a+p2p, allgather, got 'ring'"),
    (ParallelConfig(tensor_parallel=2, sequence_parallel=True),
     "sequence parallelism needs Transformer Engine on CUDA"),
    (ParallelConfig(fp8=TransformerFp8Config(recipe="tensorwise")),
     ("FP8 for the transformer layers (parallel.fp8.recipe=tensorwise) needs Transformer "
      "Engine on CUDA; this machine has no CUDA and no Transformer Engine; FP8 GEMMs of the "
      "loss's output layer (loss_fp8) run without Transformer Engine")),
    (ParallelConfig(use_te=True),
     ("use_te=true needs Transformer Engine on CUDA; this machine has no CUDA and no "
      "Transformer Engine")),
    (ParallelConfig(sequence_parallel=True), "sequence_parallel needs tensor_parallel > 1"),
    (ParallelConfig(pipeline_parallel=0), "parallel.pipeline_parallel must be >= 1"),
    (ParallelConfig(virtual_pipeline_stages=2),
     "parallel.virtual_pipeline_stages=2 needs pipeline_parallel > 1"),
])
def test_gpu_only_features_are_refused_on_cpu(parallel, message):
    with pytest.raises(ValueError) as err:
        parallel.validate(CPU)
    assert message in str(err.value)


def test_gpu_only_features_are_accepted_with_te_on_cuda():
    parallel = ParallelConfig(tensor_parallel=2, context_parallel=2, sequence_parallel=True,
                              fp8=TransformerFp8Config())
    parallel.validate(GPU_WITH_TE)
    assert parallel.uses_te(GPU_WITH_TE)
    assert not parallel.uses_te(CPU)


def _gpu_with_te(version, capability=(9, 0)):
    return Runtime(cuda=True, transformer_engine=True, cuda_capability=capability,
                   transformer_engine_version=version)


@pytest.mark.parametrize("recipe, runtime, message", [
    ("tensorwise", _gpu_with_te("2.1.0"),
     "parallel.fp8.recipe=tensorwise needs Transformer Engine >= 2.2.0.dev0; this machine "
     "has 2.1.0"),
    ("blockwise", _gpu_with_te("2.2.0"),
     "parallel.fp8.recipe=blockwise needs Transformer Engine >= 2.3.0.dev0; this machine "
     "has 2.2.0"),
    ("mxfp8", _gpu_with_te("2.8.0", (9, 0)),
     "parallel.fp8.recipe=mxfp8 needs a Blackwell GPU (compute capability >= 10.0); this "
     "one has 9.0"),
    ("delayed", GPU_WITHOUT_TE, "FP8 for the transformer layers (parallel.fp8.recipe=delayed) "
                                "needs Transformer Engine on CUDA; this machine has CUDA and "
                                "no Transformer Engine"),
])
def test_te_fp8_recipes_the_installed_te_or_gpu_lacks_are_refused(recipe, runtime, message):
    with pytest.raises(ValueError) as err:
        ParallelConfig(fp8=TransformerFp8Config(recipe=recipe)).validate(runtime)
    assert message in str(err.value)


@pytest.mark.parametrize("recipe, runtime", [
    ("delayed", _gpu_with_te("1.13.0")), ("tensorwise", _gpu_with_te("2.2.0")),
    ("blockwise", _gpu_with_te("2.3.0")), ("mxfp8", _gpu_with_te("2.1.0", (10, 0))),
    ("tensorwise", GPU_WITH_TE),  # TE version not known: Megatron checks it when building
])
def test_te_fp8_recipe_maps_to_megatrons_transformer_config(recipe, runtime):
    from megatron_dgrpo.models.provider import transformer_config

    for fmt in ("hybrid", "e4m3"):
        parallel = ParallelConfig(fp8=TransformerFp8Config(recipe=recipe, format=fmt))
        config = transformer_config(ModelConfig(), parallel, runtime)
        assert (config.fp8, config.fp8_recipe) == (fmt, recipe)
    assert transformer_config(ModelConfig(), ParallelConfig(), runtime).fp8 is None


def test_bad_te_fp8_options_name_the_option():
    from megatron_dgrpo.config import from_dict

    with pytest.raises(ValueError, match="fp8.recipe: 'current' is not one of"):
        from_dict(ParallelConfig, {"fp8": {"recipe": "current"}})
    with pytest.raises(ValueError, match="parallel.fp8.recipe must be one of delayed, "
                                         "tensorwise, blockwise, mxfp8, got 'current'"):
        TransformerFp8Config(recipe="current").validate()
    # The boolean of earlier versions:
    with pytest.raises(ValueError, match="fp8: expected a mapping for TransformerFp8Config, "
                                         "got True"):
        from_dict(ParallelConfig, {"fp8": True})


def test_te_switched_off_refuses_context_parallel_even_on_gpu():
    with pytest.raises(ValueError, match="parallel.use_te is false"):
        ParallelConfig(context_parallel=2, use_te=False).validate(GPU_WITH_TE)
    with pytest.raises(ValueError, match="CUDA and no Transformer Engine"):
        ParallelConfig(context_parallel=2).validate(GPU_WITHOUT_TE)



def test_allgather_context_parallel_runs_without_te():
    parallel = ParallelConfig(context_parallel=2, cp_comm_type="allgather")
    for runtime in (CPU, GPU_WITHOUT_TE):
        parallel.validate(runtime)
        assert not parallel.uses_te(runtime)


@pytest.mark.parametrize("changes, message", [
    ({"architecture": "llama"}, "unsupported architecture 'llama'; supported: qwen3"),
    ({"num_attention_heads": 6, "num_query_groups": 4}, "must be a multiple of"),
    ({"hidden_size": 0}, "model.hidden_size must be >= 1"),
    ({"params_dtype": "fp16"}, "params_dtype must be 'fp32' or 'bf16'"),
    ({"qk_layernorm": False}, "qk_layernorm must be true for qwen3"),
])
def test_model_config_errors(changes, message):
    with pytest.raises(ValueError) as err:
        dataclasses.replace(ModelConfig(), **changes).validate()
    assert message in str(err.value)


@pytest.mark.parametrize("vocab, tp, divisible_by, padded", [
    (151936, 1, 128, 151936),   # already a multiple of 128
    (151936, 2, 128, 152064),   # next multiple of 256
    (1000, 1, 128, 1024),
    (1000, 4, 128, 1024),
    (1000, 8, 128, 1024),
    (1000, 3, 128, 1152),
    (1000, 2, 1, 1000),
])
def test_padded_vocab_is_next_multiple_of_divisible_by_times_tp(vocab, tp, divisible_by, padded):
    config = dataclasses.replace(ModelConfig(), vocab_size=vocab,
                                 make_vocab_size_divisible_by=divisible_by)
    assert config.padded_vocab_size(tp) == padded


def _hub_style_qwen3_config() -> dict:
    """config.json as published for Qwen/Qwen3-0.6B (transformers 4.x keys)."""
    return {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False,
            "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
            "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
            "initializer_range": 0.02, "intermediate_size": 3072,
            "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
            "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
            "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
            "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
            "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}


def test_hub_style_config_json_is_read():
    config = ModelConfig.from_hf_config(_hub_style_qwen3_config())
    assert (config.num_layers, config.hidden_size, config.ffn_hidden_size,
            config.num_attention_heads, config.num_query_groups, config.head_dim,
            config.vocab_size, config.rope_base, config.tie_word_embeddings,
            config.params_dtype) == (28, 1024, 3072, 16, 8, 128, 151936, 1e6, True, "bf16")


def test_to_hf_config_round_trips_and_transformers_reads_it():
    from transformers import Qwen3Config

    config = dataclasses.replace(ModelConfig(), rope_base=5e5, tie_word_embeddings=False,
                                 params_dtype="bf16")
    hf = config.to_hf_config()
    assert ModelConfig.from_hf_config(hf) == config
    transformers_config = Qwen3Config(**hf)
    assert transformers_config.rope_parameters["rope_theta"] == 5e5
    assert transformers_config.num_key_value_heads == config.num_query_groups
    assert transformers_config.head_dim == config.head_dim


@pytest.mark.parametrize("edit, message", [
    ({"model_type": "llama"}, "unsupported architecture: config.json has model_type='llama'"),
    ({"head_dim": None}, "missing required field(s): head_dim"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}},
     "rope scaling 'dynamic'; supported: plain RoPE and yarn"),
    ({"attention_bias": True}, "unsupported option(s): attention_bias=True"),
    ({"torch_dtype": "float16"}, "dtype 'float16' is not supported"),
])
def test_unsupported_hf_configs_are_refused(edit, message):
    hf = {**_hub_style_qwen3_config(), **edit}
    with pytest.raises(ValueError) as err:
        ModelConfig.from_hf_config(hf)
    assert message in str(err.value)
