"""The vLLM engine against an independent reference: the same checkpoint run by transformers.

One in-process engine serves the whole module (vLLM start-up dominates the cost).
"""

import json

import pytest
import torch
from tiny_vllm_models import PROMPTS, write_tiny_qwen3

from megatron_dgrpo.models.config import ModelConfig
from megatron_dgrpo.rollout.engine import SamplingParams
from megatron_dgrpo.rollout.vllm_engine import (
    EngineUnavailableError,
    VLLMEngine,
    check_model_for_backend,
    require_engine_package,
)

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="module")
def engine(model_dir):
    return VLLMEngine(model_dir, dtype="float32", max_model_len=128, in_process=True)


@pytest.fixture(scope="module")
def reference(model_dir):
    from transformers import Qwen3ForCausalLM

    return Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def reference_logprobs(reference, prompt, response, temperature):
    """log_softmax(logits / T) of each response token given its prefix (transformers)."""
    tokens = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = reference(tokens).logits[0].double()
    scaled = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
    return [float(scaled[len(prompt) + i - 1, t]) for i, t in enumerate(response)]


def test_greedy_matches_transformers(engine, reference):
    batch = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=6))
    assert [r.prompt_index for r in batch.rollouts] == [0, 1, 2]
    for rollout, prompt in zip(batch.rollouts, PROMPTS):
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
        assert rollout.response_ids == expected[0, len(prompt):].tolist()
        assert rollout.finish_reason == "length"
        assert rollout.logprobs == pytest.approx(
            reference_logprobs(reference, prompt, rollout.response_ids, 0.0), abs=1e-4)
    assert batch.seconds > 0 and batch.num_generated_tokens == 18


def test_sampled_logprobs_are_temperature_scaled_and_grouped(engine, reference):
    params = SamplingParams(n=3, temperature=0.7, max_new_tokens=5, seed=3)
    batch = engine.generate(PROMPTS[:2], params)
    assert [r.prompt_index for r in batch.rollouts] == [0, 0, 0, 1, 1, 1]
    for rollout in batch.rollouts:
        assert rollout.logprobs == pytest.approx(reference_logprobs(
            reference, rollout.prompt_ids, rollout.response_ids, 0.7), abs=1e-4)


def test_top_k_logprobs_are_untruncated(engine, reference):
    batch = engine.generate(PROMPTS[:1], SamplingParams(n=2, temperature=1.0, top_k=3,
                                                         top_p=0.9, max_new_tokens=5))
    for rollout in batch.rollouts:
        assert rollout.logprobs == pytest.approx(reference_logprobs(
            reference, rollout.prompt_ids, rollout.response_ids, 1.0), abs=1e-4)


def test_stop_token_ends_with_the_stop_token_kept(engine):
    greedy = engine.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=6))
    stop = greedy.rollouts[0].response_ids[2]
    first = greedy.rollouts[0].response_ids.index(stop)
    stopped = engine.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=6,
                                                           stop_token_ids=[stop]))
    rollout = stopped.rollouts[0]
    assert rollout.finish_reason == "stop"
    assert rollout.response_ids == greedy.rollouts[0].response_ids[:first + 1]


def test_unsupported_combinations_are_refused(engine):
    with pytest.raises(ValueError, match="only at temperature 1"):
        engine.generate(PROMPTS, SamplingParams(temperature=0.7, top_k=5))
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        engine.generate(PROMPTS, SamplingParams(stop_strings=["x"]))
    with pytest.raises(ValueError, match="no prompt may be empty"):
        engine.generate([[]], SamplingParams())


def test_sleep_is_a_logged_no_op_on_cpu(engine, caplog):
    if not engine.on_cpu:
        pytest.skip("GPU sleep mode is exercised on GPU machines")
    with caplog.at_level("INFO"):
        engine.sleep()
    engine.wake_up()
    assert "no sleep mode" in caplog.text
    assert engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2)).rollouts


def test_missing_engine_package_fails_clearly(model_dir):
    with pytest.raises(EngineUnavailableError, match="'vllm_not_installed' package"):
        require_engine_package("vllm_not_installed")
    with pytest.raises(EngineUnavailableError, match="not installed"):
        VLLMEngine(model_dir, package="vllm_not_installed")


def test_head_dim_unsupported_on_cpu_fails_at_start_up(tmp_path):
    bad = tmp_path / "head16"
    bad.mkdir()
    hf = ModelConfig(head_dim=16).to_hf_config()
    (bad / "config.json").write_text(json.dumps(hf))
    with pytest.raises(EngineUnavailableError, match="head_dim 16 .* not supported"):
        check_model_for_backend(bad, on_cpu=True)
    assert check_model_for_backend(bad, on_cpu=False).head_dim == 16


def test_architecture_without_mapping_fails_at_start_up(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        check_model_for_backend(tmp_path, on_cpu=True)
