"""The per-GPU memory arithmetic (megatron_dgrpo/train/memory.py) against hand-computed
numbers and, for parameter counts, against transformers' own Qwen3 models (built on the
meta device: no memory)."""

from pathlib import Path

import pytest
import torch

from megatron_dgrpo.cli import main
from megatron_dgrpo.models.presets import get_preset
from megatron_dgrpo.train import memory
from megatron_dgrpo.train.memory import Budget, MemoryPlan, Term

GIB = 2 ** 30
QWEN3_8B = get_preset("qwen3-8b")
CPU_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cpu_tiny_dgrpo.yaml"


@pytest.mark.parametrize("preset", ["qwen3-1.7b", "qwen3-8b", "qwen3-32b"])
def test_unsharded_parameters_equal_transformers_model(preset):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = get_preset(preset)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**config.to_hf_config()))
    # the vocabulary is a multiple of 128 already, so TP=1 pads nothing
    assert config.padded_vocab_size(1) == config.vocab_size
    assert memory.shard_parameters(config, 1, 1) == sum(p.numel() for p in model.parameters())


def test_qwen3_8b_shard_at_tp8_by_hand():
    # vocab 151936 padded to a multiple of 128 x 8 = 1024: 152576 rows, 1/8 per rank
    embedding = 152576 * 4096 // 8                                 # 78,118,912
    qkv, out, mlp = 4096 * (32 + 2 * 8) * 128, 32 * 128 * 4096, 3 * 4096 * 12288
    layer = (qkv + out + mlp) // 8 + 2 * 4096 + 2 * 128            # 24,125,696
    expected = 2 * embedding + 36 * layer + 4096                   # untied output, final norm
    assert expected == 1_024_766_976
    assert memory.shard_parameters(QWEN3_8B, 8, 1) == expected
    # PP=2: 18 layers per stage; embedding on the first, norm + output layer on the last
    assert memory.shard_parameters(QWEN3_8B, 8, 2) == 18 * layer + embedding + 4096


def test_tied_embeddings_count_once_except_on_a_later_stage():
    tied = get_preset("qwen3-1.7b")
    embedding = 151936 * 2048  # 151936 = 1187 x 128: no padding at TP 1
    layer = 2048 * 32 * 128 + 16 * 128 * 2048 + 3 * 2048 * 6144 + 2 * 2048 + 2 * 128
    assert memory.shard_parameters(tied, 1, 1) == embedding + 28 * layer + 2048
    assert memory.shard_parameters(tied, 1, 2) == 14 * layer + 2048 + embedding


def test_trained_parameter_bytes():
    assert memory.student_bytes_per_parameter("bf16") == 2 + 2 + 4 + 4 + 8
    assert memory.student_bytes_per_parameter("fp32") == 4 + 4 + 8


def test_activations_by_hand():
    # per token and layer: norms 4h = 16384, attention 3(a + g)d = 15360, MLP 3F = 36864
    with_sp = (16384 + 15360 + 36864) / 8
    without_sp = 16384 + (15360 + 36864) / 8
    assert memory.activation_elements_per_token(QWEN3_8B, 8, True) == with_sp == 8576
    assert memory.activation_elements_per_token(QWEN3_8B, 8, False) == without_sp == 22912
    # 36 layers x 32768 tokens x 8576 elements x 2 bytes: the 32K examples' 18.84 GiB
    assert memory.activation_bytes(QWEN3_8B, 32768, 8, 1, True) == 36 * 32768 * 8576 * 2
    # PP=2 holds 2 micro-batches of 18 layers (1F1B): the same bytes
    assert memory.activation_bytes(QWEN3_8B, 32768, 8, 2, True) == 36 * 32768 * 8576 * 2
    # interleaved, PP=2 x VP=2: rank 0 warms up 2 (p - 1) + (v - 1) p = 4 chunk forwards
    # and holds one more in the steady state, 5 chunks of 36 / 4 = 9 layers
    assert memory.activation_bytes(QWEN3_8B, 32768, 8, 2, True, virtual_stages=2) == \
        45 * 32768 * 8576 * 2
    # PP=4 x VP=3: 2 x 3 + 2 x 4 + 1 = 15 chunk forwards of 3 layers
    assert memory.activation_bytes(QWEN3_8B, 32768, 8, 4, True, virtual_stages=3) == \
        45 * 32768 * 8576 * 2


def test_kv_cache_by_hand():
    per_token = 36 * 2 * 8 * 128 * 2  # layers x (k, v) x heads x head_dim x bf16
    assert memory.kv_cache_bytes(QWEN3_8B, 131072, 1, 2) == per_token * 131072 == 18 * GIB
    assert memory.kv_cache_bytes(QWEN3_8B, 131072, 8, 2) == per_token * 131072 // 8
    # 16 engine ranks for 8 key/value heads: one (replicated) head per rank, as at TP 8
    assert memory.kv_cache_bytes(QWEN3_8B, 100, 16, 2) == memory.kv_cache_bytes(
        QWEN3_8B, 100, 8, 2)


def test_fused_loss_buffers_by_hand():
    local_vocab = 152576 // 8                           # 19072 columns per TP rank
    hidden = 2 * 32768 * 4096 * 2                      # both models' final hidden states, bf16
    grads = local_vocab * 4096 * 4 + 4096 * 4096 * 4   # output weight, hidden states (fp32)
    chunks = 3 * 1024 * local_vocab * 4                # logits x 2 + probabilities (GPU)
    assert memory.loss_bytes(QWEN3_8B, 32768, 4096, 8, True, 1024, True) == \
        hidden + grads + chunks
    materialised = 2 * 32768 * 4096 * 2 + 3 * 32768 * local_vocab * 4
    assert memory.loss_bytes(QWEN3_8B, 32768, 4096, 8, False, None, True) == materialised


def test_engine_weights_by_hand():
    terms = memory.engine_terms(QWEN3_8B, 8, 2, 32768, 4, "engine")
    layer = (4096 * 48 * 128 + 32 * 128 * 4096 + 3 * 4096 * 12288) // 8 + 2 * 4096 + 2 * 128
    weights = (36 * layer + 151936 // 8 * 4096 * 2 + 4096) * 2
    assert terms[0].bytes == weights
    assert terms[1].bytes == memory.kv_cache_bytes(QWEN3_8B, 4 * 32768, 8, 2)
    assert "4 x 32768 tokens" in terms[1].name


def test_the_first_phase_that_does_not_fit_is_named_with_its_largest_term():
    plan = MemoryPlan((
        Budget("rollout and refit", (Term("a", GIB),), 2 * GIB, "GPU"),
        Budget("training", (Term("weights", GIB), Term("activations", 3 * GIB)), 2 * GIB, "GPU"),
    ))
    with pytest.raises(ValueError, match=r"the training phase needs 4.00 GiB of GPU 2.00 GiB "
                                         r"\(2.00 GiB over\); largest term: activations = "
                                         r"3.00 GiB"):
        plan.check()
    assert "training: 4.00 GiB of GPU 2.00 GiB (DOES NOT FIT)" in plan.summary()


def test_dry_run_prints_the_budget_without_building_anything(capsys):
    code = main(["train", "--config", str(CPU_EXAMPLE), "--dry-run", "parallel.gpu_memory_gib=24"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("config is valid\n")
    assert "notice: parallel.gpu_memory_gib has no effect here" in out
    # 2 prompts x n 2 rollouts of 4096 + 4 tokens: the embedded engine's static KV cache
    assert "embedded engine KV cache (4 x 4100 tokens)" in out
    assert "training:" in out and "of GPU 24.00 GiB (fits)" in out


def _phases(*overrides):
    from megatron_dgrpo.config import load_config
    from megatron_dgrpo.train.config import RunConfig

    config = load_config(RunConfig, CPU_EXAMPLE, ["rollout.engine=vllm",
                                                  "data.max_prompt_tokens=1024", *overrides])
    plan = memory.plan_memory(config, 24 * GIB)
    return {budget.phase: {term.name: term.bytes for term in budget.terms}
            for budget in plan.budgets}


def test_offload_and_sleep_move_terms_between_phases():
    awake = _phases("teacher.offload=true", "rollout.sleep_level=0")
    share = "vLLM rollout engine (gpu_memory_utilization 0.5)"
    teacher = "teacher weights (frozen shard, offloaded while sampling)"
    assert teacher not in awake["rollout and refit"] and teacher in awake["training"]
    assert awake["rollout and refit"][share] == awake["training"][share] == 12 * GIB
    asleep = _phases("rollout.sleep_level=2")
    assert share not in asleep["training"]
    assert asleep["training"]["vLLM rollout engine asleep: CUDA graphs and context "
                              "(allowance)"] == GIB
    assert "teacher weights (frozen shard)" in asleep["rollout and refit"]
    # 2 x refit_bucket_mb (256 MB): the gathered bucket and its shards
    assert asleep["rollout and refit"]["refit bucket + its TP shards (2 x refit_bucket_mb)"] \
        == 512_000_000
