"""The CUDA paths, checked on a GPU machine by ``tools/validate_gpu.sh``; skipped elsewhere.

Every check compares against an independent reference computed in the same process:
``transformers`` for the model and greedy decoding, the materialised loss (and a float64
copy on the CPU) for the fused loss, an uninterrupted run for resume. Each Megatron check
runs in its own spawned process (NCCL, one rank) so CUDA state never leaks between tests.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [[11, 42, 7, 300, 5, 64], [901, 2, 77], [15, 15, 16, 17, 512]]
NEW_TOKENS = 8


def _exact_fp32() -> None:
    """No TF32: the fp32 comparisons below are meant to be fp32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _megatron_on_cuda(rank, world_size, ckpt_dir, dtype_name):
    """Logits of PROMPTS[0] and greedy responses from the checkpoint loaded on the GPU."""
    from megatron_dgrpo.models.config import ParallelConfig
    from megatron_dgrpo.models.convert import MegatronCheckpoint, load_megatron_checkpoint_into
    from megatron_dgrpo.models.provider import build_gpt_model, initialize_parallel
    from megatron_dgrpo.rollout.embedded import EmbeddedEngine
    from megatron_dgrpo.rollout.engine import SamplingParams

    _exact_fp32()
    config = dataclasses.replace(MegatronCheckpoint(ckpt_dir).config, params_dtype=dtype_name)
    initialize_parallel(ParallelConfig())
    model = build_gpt_model(config, ParallelConfig())
    load_megatron_checkpoint_into(model, ckpt_dir)
    model.eval()
    devices = {p.device.type for p in model.parameters()}
    with torch.no_grad():
        ids = torch.tensor([PROMPTS[0]], device="cuda")
        logits = model(ids, torch.arange(ids.shape[1], device="cuda")[None], None)
    engine = EmbeddedEngine(model, vocab_size=config.vocab_size)
    rollouts = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS))
    sampled = engine.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, top_p=0.9,
                                                      max_new_tokens=NEW_TOKENS, seed=3))
    return {"devices": sorted(devices),
            "logits": logits[0, :, :config.vocab_size].float().cpu(),
            "greedy": [r.response_ids for r in rollouts.rollouts],
            "sampled_lengths": [len(r.response_ids) for r in sampled.rollouts],
            "sampled_logprobs_finite": all(torch.isfinite(torch.tensor(r.logprobs)).all()
                                           for r in sampled.rollouts)}


@pytest.fixture(scope="module")
def hf_and_megatron(tmp_path_factory):
    from megatron_dgrpo.models.presets import get_preset
    from megatron_dgrpo.testing.tiny_models import write_random_qwen3

    root = tmp_path_factory.mktemp("cuda_model")
    config = dataclasses.replace(get_preset("small-qwen3"), params_dtype="fp32")
    hf_model = write_random_qwen3(config, root / "hf", root / "megatron", seed=0)
    return hf_model, root / "megatron"


def _hf_reference(hf_model, dtype):
    _exact_fp32()
    model = hf_model.to(device="cuda", dtype=dtype)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[0]], device="cuda")).logits[0].float().cpu()
        greedy = [model.generate(torch.tensor([p], device="cuda"), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
    hf_model.to(device="cpu", dtype=torch.float32)
    return logits, greedy


def test_megatron_fp32_on_cuda_matches_transformers(hf_and_megatron):
    from megatron_dgrpo.parallel.launch import run_distributed

    hf_model, ckpt = hf_and_megatron
    reference_logits, reference_greedy = _hf_reference(hf_model, torch.float32)
    result = run_distributed(_megatron_on_cuda, 1, args=(str(ckpt), "fp32"), backend="nccl")[0]
    assert result["devices"] == ["cuda"]
    diff = (result["logits"] - reference_logits).abs().max().item()
    print(f"fp32 logits max |diff| vs transformers on CUDA: {diff:.3e}")
    assert diff < 1e-4
    assert result["greedy"] == reference_greedy
    assert result["sampled_logprobs_finite"]
    assert all(1 <= n <= NEW_TOKENS for n in result["sampled_lengths"])


def test_megatron_bf16_on_cuda_close_to_transformers_bf16(hf_and_megatron):
    from megatron_dgrpo.parallel.launch import run_distributed

    hf_model, ckpt = hf_and_megatron
    reference_logits, _ = _hf_reference(hf_model, torch.bfloat16)
    fp32_logits, _ = _hf_reference(hf_model, torch.float32)
    result = run_distributed(_megatron_on_cuda, 1, args=(str(ckpt), "bf16"), backend="nccl")[0]
    ours = (result["logits"] - fp32_logits).abs().max().item()
    theirs = (reference_logits - fp32_logits).abs().max().item()
    print(f"bf16 logits max |diff| from fp32: megatron {ours:.3e}, transformers {theirs:.3e}")
    # bf16 rounding differs between the two implementations; both must stay as close to
    # the fp32 answer as bf16 allows (within a few times transformers' own error).
    assert ours < max(4 * theirs, 5e-2)


def test_megatron_yarn_fp32_on_cuda_matches_transformers(tmp_path):
    """YaRN rotary scaling (Megatron's YarnRotaryEmbedding and the attention's q/k factor)
    on CUDA: logits and cached greedy decoding against transformers."""
    from megatron_dgrpo.models.presets import get_preset
    from megatron_dgrpo.parallel.launch import run_distributed
    from megatron_dgrpo.testing.tiny_models import write_random_qwen3

    config = dataclasses.replace(get_preset("small-qwen3"), params_dtype="fp32", yarn_factor=4.0,
                                 yarn_original_max_position_embeddings=16)
    hf_model = write_random_qwen3(config, tmp_path / "hf", tmp_path / "megatron", seed=1)
    reference_logits, reference_greedy = _hf_reference(hf_model, torch.float32)
    result = run_distributed(_megatron_on_cuda, 1, args=(str(tmp_path / "megatron"), "fp32"),
                             backend="nccl")[0]
    diff = (result["logits"] - reference_logits).abs().max().item()
    print(f"YaRN fp32 logits max |diff| vs transformers on CUDA: {diff:.3e}")
    assert diff < 1e-4
    assert result["greedy"] == reference_greedy


def test_fused_loss_on_cuda_matches_materialized_and_float64():
    from megatron_dgrpo.algorithms import LossConfig, TokenBatch, token_weights
    from megatron_dgrpo.parallel.fused import loss_from_hidden
    from megatron_dgrpo.parallel.materialized import loss_from_logits

    _exact_fp32()
    gen = torch.Generator().manual_seed(0)
    tokens, hidden_size, vocab = 3000, 256, 32000
    data = {"hidden": torch.randn(1, tokens, hidden_size, generator=gen),
            "weight": torch.randn(vocab, hidden_size, generator=gen) * 0.05,
            "teacher_hidden": torch.randn(1, tokens, hidden_size, generator=gen),
            "teacher_weight": torch.randn(vocab, hidden_size, generator=gen) * 0.05}
    mask = torch.rand(1, tokens, generator=gen) > 0.1
    signals = {"targets": torch.randint(0, vocab, (1, tokens), generator=gen),
               "advantages": torch.randn(1, tokens, generator=gen),
               "old_logp": -torch.rand(1, tokens, generator=gen) * 8,
               "rollout_logp": -torch.rand(1, tokens, generator=gen) * 8}
    config = LossConfig(objective="dgrpo", kl_estimator="full")

    def run(method, device, dtype):
        inputs = {k: v.to(device, dtype, copy=True).requires_grad_(k in ("hidden", "weight"))
                  for k, v in data.items()}
        batch_mask = mask.to(device)
        batch = TokenBatch(loss_mask=batch_mask, weights=token_weights(batch_mask, "token_mean"),
                           **{k: v.to(device) if v.dtype == torch.long else v.to(device, dtype)
                              for k, v in signals.items()})
        if method == "fused":
            loss, metrics = loss_from_hidden(config, batch, inputs["hidden"], inputs["weight"],
                                             inputs["teacher_hidden"], inputs["teacher_weight"])
        else:
            loss, metrics = loss_from_logits(config, batch, inputs["hidden"] @ inputs["weight"].T,
                                             inputs["teacher_hidden"] @ inputs["teacher_weight"].T)
        loss.backward()
        return (loss.detach().double().cpu(), inputs["hidden"].grad.double().cpu(),
                inputs["weight"].grad.double().cpu(),
                {k: float(v) for k, v in metrics.as_dict().items()})

    reference = run("materialized", "cpu", torch.float64)
    for method in ("fused", "materialized"):
        torch.cuda.reset_peak_memory_stats()
        loss, grad_hidden, grad_weight, metrics = run(method, "cuda", torch.float32)
        print(f"{method} on CUDA: peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
        torch.testing.assert_close(loss, reference[0], rtol=1e-5, atol=1e-6)
        for name, got, expected in (("hidden", grad_hidden, reference[1]),
                                    ("weight", grad_weight, reference[2])):
            error = ((got - expected).abs().max() / expected.abs().max()).item()
            print(f"{method} on CUDA: grad {name} max |error| / max |grad| = {error:.2e}")
            assert error < 1e-4, name
        for name, value in reference[3].items():
            assert metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


# ------------------------------------------------------------------ the trainer on CUDA


@pytest.fixture(scope="module")
def training_assets(tmp_path_factory):
    from megatron_dgrpo.cli import main
    from megatron_dgrpo.data.chat import load_chat_tokenizer
    from megatron_dgrpo.data.tiny_tokenizer import train_tiny_tokenizer

    root = tmp_path_factory.mktemp("cuda_train")
    tokenizer = train_tiny_tokenizer(root / "tokenizer", vocab_size=400)
    assert main(["data", "synth", "--out", str(root / "data"), "--num", "8", "--lengths", "256",
                 "--seed", "3"]) == 0
    return root, tokenizer, load_chat_tokenizer(tokenizer).vocab_size


def _train_on_cuda(rank, world_size, config_dict):
    from megatron_dgrpo.config import from_dict
    from megatron_dgrpo.train.config import RunConfig
    from megatron_dgrpo.train.metrics import read_metrics
    from megatron_dgrpo.train.runner import run_training

    config = from_dict(RunConfig, config_dict)
    config.validate()
    code = run_training(config, show_progress=False)
    return code, read_metrics(config.run_dir)


def _run_config(assets, run_dir, steps, objective="dgrpo", **overrides):
    from megatron_dgrpo.models.presets import get_preset

    root, tokenizer, vocab = assets
    student = dataclasses.asdict(dataclasses.replace(get_preset("tiny-qwen3"), vocab_size=vocab))
    teacher = dataclasses.asdict(dataclasses.replace(get_preset("small-qwen3"), vocab_size=vocab))
    return {"run_dir": str(root / run_dir), "steps": steps, "save_every": 1, "keep_last": 5,
            "prompts_per_step": 2, "tokenizer": str(tokenizer),
            "student": {"preset": None, "model": student},
            "teacher": {"preset": None, "model": teacher},
            "loss": {"objective": objective},
            "sampling": {"n": 2, "max_new_tokens": 6, "temperature": 1.0},
            "data": {"paths": [str(root / "data")], "max_prompt_tokens": 4096},
            "optim": {"lr": 1e-3, "clip_grad": 1.0}, **overrides}


def _final_weights(run_dir, step):
    from safetensors.torch import load_file

    return load_file(f"{run_dir}/checkpoints/step_{step:08d}/model/mp_rank_00_000/model.safetensors")


def test_trainer_on_cuda_trains_clips_and_resumes(training_assets):
    """dGRPO on the GPU with Megatron's grad clipping (CUDA only); a run stopped after step 1
    and resumed ends where an uninterrupted run ends."""
    from megatron_dgrpo.parallel.launch import run_distributed

    straight = _run_config(training_assets, "straight", steps=3)
    code, metrics = run_distributed(_train_on_cuda, 1, args=(straight,), backend="nccl")[0]
    assert code == 0 and [m["step"] for m in metrics] == [1, 2, 3]
    for row in metrics:
        assert torch.isfinite(torch.tensor(row["loss"]))
        assert row["memory/peak_gpu_gb"] > 0
    print("per-step metrics:", [{k: round(v, 5) for k, v in m.items()
                                 if k in ("loss", "policy/kl_teacher", "memory/peak_gpu_gb")}
                                for m in metrics])

    resumed = _run_config(training_assets, "resumed", steps=1)
    run_distributed(_train_on_cuda, 1, args=(resumed,), backend="nccl")
    code, resumed_metrics = run_distributed(_train_on_cuda, 1,
                                            args=({**resumed, "steps": 3},), backend="nccl")[0]
    assert code == 0 and [m["step"] for m in resumed_metrics] == [1, 2, 3]
    for a, b in zip(metrics, resumed_metrics):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    weights_a = _final_weights(straight["run_dir"], 3)
    weights_b = _final_weights(resumed["run_dir"], 3)
    worst = max((weights_a[n] - weights_b[n]).abs().max().item() for n in weights_a)
    print(f"resume on CUDA: max |weight diff| after 3 steps {worst:.3e}")
    assert worst < 1e-5


def test_trainer_on_cuda_fused_and_materialized_losses_agree(training_assets):
    """The trainer's default fused loss (no [tokens x vocab] logits) gives the materialised
    loss's first step on the GPU: same loss, same KL to the teacher."""
    from megatron_dgrpo.parallel.launch import run_distributed

    results = {}
    for impl in ("fused", "materialized"):
        config = _run_config(training_assets, f"impl-{impl}", steps=1, loss_impl=impl)
        code, metrics = run_distributed(_train_on_cuda, 1, args=(config,), backend="nccl")[0]
        assert code == 0
        results[impl] = metrics[0]
    print("fused vs materialized step 1:", {k: (results["fused"][k], results["materialized"][k])
                                           for k in ("loss", "policy/kl_teacher")})
    for key in ("loss", "policy/kl_teacher", "policy/entropy"):
        assert results["fused"][key] == pytest.approx(results["materialized"][key], rel=1e-4,
                                                      abs=1e-6), key
