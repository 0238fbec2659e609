"""Teacher top-k cache: TP-sharded top-k vs the unsharded float64 one, the cache vs a
`transformers` teacher, and KD training from the cache on real TP=2 ranks."""

import dataclasses

import pytest
import torch

from megatron_dgrpo.parallel.launch import run_distributed

pytestmark = pytest.mark.multiproc


def _sharded_topk(rank, world_size, logits, k, vocab_size):
    from megatron_dgrpo.parallel.vocab import vocab_parallel_topk

    local = logits.shape[-1] // world_size
    shard = logits[:, rank * local:(rank + 1) * local]
    return vocab_parallel_topk(shard, k, vocab_size, torch.distributed.group.WORLD)


def test_vocab_parallel_topk_equals_unsharded_float64():
    torch.manual_seed(0)
    logits = torch.randn(7, 256) * 3
    vocab_size = 250  # the last 6 columns are TP padding and must never be picked
    logits[:, vocab_size:] = 50.0
    reference = torch.log_softmax(logits[:, :vocab_size].double(), dim=-1).topk(5, dim=-1)
    for indices, logp in run_distributed(_sharded_topk, 2, args=(logits, 5, vocab_size)):
        assert torch.equal(indices, reference.indices)
        assert torch.allclose(logp.double(), reference.values, atol=1e-5)


@pytest.fixture(scope="module")
def teacher_setup(teacher_with_cache):
    """(root with hf/ teacher/ data/ cache/, the transformers teacher, the tokenizer)."""
    shared = teacher_with_cache
    return shared.root, shared.hf_teacher, shared.tokenizer


def test_cache_matches_transformers_teacher(teacher_setup):
    from megatron_dgrpo.data.longblocks import LongBlocksConfig, LongBlocksLoader
    from megatron_dgrpo.train.teacher_cache import TeacherTopKCache

    root, teacher, tokenizer = teacher_setup
    cache = TeacherTopKCache(root / "cache")
    assert cache.k == 8
    loader = LongBlocksLoader(LongBlocksConfig(paths=(str(root / "data"),), split="all"), tokenizer)
    for _, example in zip(range(4), loader):
        response = tokenizer.response_ids(example.user_message, example.reference_answer)
        sequence = torch.tensor([example.prompt_ids + response])
        with torch.no_grad():
            logp = torch.log_softmax(teacher(sequence).logits[0].double(), dim=-1)
        # Positions predicting the response tokens: prompt_len - 1 .. len - 2.
        start = len(example.prompt_ids) - 1
        reference = logp[start:start + len(response)].topk(8, dim=-1)
        indices, values = cache.lookup(example.id)
        assert torch.equal(indices, reference.indices)
        # fp32 Megatron vs fp32 transformers over ~600-token sequences with large logits
        worst = (values.double() - reference.values).abs().max().item()
        assert worst < 3e-4, worst
    with pytest.raises(KeyError, match="not in the teacher cache"):
        cache.lookup("no-such-id")


def _train(rank, world_size, config_dict):
    from megatron_dgrpo.config import from_dict
    from megatron_dgrpo.train.config import RunConfig
    from megatron_dgrpo.train.runner import run_training

    return run_training(from_dict(RunConfig, config_dict), show_progress=False)


def test_kd_trains_from_the_cache_at_tp2(teacher_setup, hf_tokenizer_dir):
    from megatron_dgrpo.models.presets import get_preset
    from megatron_dgrpo.train.metrics import read_metrics

    root, _, tokenizer = teacher_setup
    student = dataclasses.asdict(dataclasses.replace(get_preset("tiny-qwen3"),
                                                     vocab_size=tokenizer.vocab_size))
    config = {"run_dir": str(root / "run"), "steps": 2, "save_every": 1, "prompts_per_step": 2,
              "tokenizer": str(hf_tokenizer_dir), "parallel": {"tensor_parallel": 2},
              "student": {"preset": None, "model": student},
              "teacher_topk_cache": str(root / "cache"),
              "loss": {"objective": "kd", "kl_estimator": "topk"},
              "data": {"paths": [str(root / "data")]}, "optim": {"lr": 1e-3}}
    assert run_distributed(_train, 2, args=(config,)) == [0, 0]
    records = read_metrics(root / "run")
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["policy/kl_teacher_forward"] > 0 for r in records)
