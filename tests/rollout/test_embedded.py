"""The embedded engine against the model's own full (cache-free) forward, on real TP ranks.

References: greedy decoding by recomputing the whole sequence for one prompt at a time, and
the teacher-forced log-softmax over prompt + response. The cached path runs the local spec's
:class:`~megatron_dgrpo.models.sdpa_attention.RotatedCacheSelfAttention` (keys rotated once,
when cached), so these references also check it against Megatron's rotation of the
uncached forward. Both use the plain forward of the
same Megatron model, without the KV cache, batching or the engine's bookkeeping.
"""

import pytest
import torch

from megatron_dgrpo.parallel.launch import run_distributed

pytestmark = pytest.mark.multiproc

PROMPTS = [[5, 17, 33, 2, 9, 41, 7], [100, 3], [8, 8, 8, 250, 11]]


def _full_logits(model, tokens, vocab_size):
    """Unsharded logits [S, V] for one sequence, no KV cache (the reference forward)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    ids = torch.tensor([tokens])
    positions = torch.arange(len(tokens)).unsqueeze(0)
    logits = gather_from_tensor_model_parallel_region(model(ids, positions, None))
    return logits[0, :, :vocab_size].double()


def _engine_checks(rank, world_size, batching):
    from megatron_dgrpo.models.config import ParallelConfig
    from megatron_dgrpo.models.presets import get_preset
    from megatron_dgrpo.models.provider import build_gpt_model, initialize_parallel
    from megatron_dgrpo.rollout.embedded import EmbeddedEngine
    from megatron_dgrpo.rollout.engine import SamplingParams

    config = get_preset("tiny-qwen3")
    parallel = ParallelConfig(tensor_parallel=world_size)
    initialize_parallel(parallel, seed=7)
    model = build_gpt_model(config, parallel)
    with torch.no_grad():  # sharper logits than the init's, so greedy paths are not ties
        for p in model.parameters():
            p.mul_(4.0)
    engine = EmbeddedEngine(model, vocab_size=config.vocab_size, batching=batching)
    assert engine.padded == (batching == "padded")
    from megatron.core.transformer.attention import SelfAttention

    from megatron_dgrpo.models.sdpa_attention import RotatedCacheSelfAttention

    attentions = [m for m in model.modules() if isinstance(m, SelfAttention)]
    assert attentions and all(type(m) is RotatedCacheSelfAttention for m in attentions)
    model.eval()

    # Greedy, batched, ragged prompts, KV cache == one-prompt-at-a-time full recompute.
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=6))
    expected = []
    with torch.no_grad():
        for prompt in PROMPTS:
            seq = list(prompt)
            for _ in range(6):
                seq.append(int(_full_logits(model, seq, config.vocab_size)[-1].argmax()))
            expected.append(seq[len(prompt):])
    assert [r.response_ids for r in greedy.rollouts] == expected
    assert all(r.finish_reason == "length" for r in greedy.rollouts)
    if batching == "padded":  # a prefill in chunks of 2 tokens decodes the same
        from megatron_dgrpo.rollout import embedded

        embedded.PREFILL_MASK_ELEMENTS, default = 2 * len(PROMPTS) * (7 + 6), \
            embedded.PREFILL_MASK_ELEMENTS
        chunked = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=6))
        embedded.PREFILL_MASK_ELEMENTS = default
        assert [r.response_ids for r in chunked.rollouts] == expected

    # Sampling with G=3, temperature and top-k: reported log-probs are the teacher-forced
    # temperature-scaled log-softmax, and every draw is inside the top-k.
    params = SamplingParams(n=3, temperature=0.7, top_k=20, max_new_tokens=5, seed=3)
    sampled = engine.generate(PROMPTS, params)
    assert [r.prompt_index for r in sampled.rollouts] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    worst = 0.0
    with torch.no_grad():
        for rollout in sampled.rollouts:
            seq = rollout.prompt_ids + rollout.response_ids
            logits = _full_logits(model, seq, config.vocab_size)
            positions = range(len(rollout.prompt_ids) - 1, len(seq) - 1)
            scaled = torch.log_softmax(logits / 0.7, dim=-1)
            for pos, token, got in zip(positions, rollout.response_ids, rollout.logprobs):
                worst = max(worst, abs(scaled[pos, token].item() - got))
                assert token in torch.topk(logits[pos], 20).indices.tolist()
    assert worst < 1e-4, worst  # fp32: cached vs full attention sum in different orders
    again = engine.generate(PROMPTS, params)
    assert [r.response_ids for r in again.rollouts] == [r.response_ids for r in sampled.rollouts]
    groups = [tuple(r.response_ids) for r in sampled.rollouts]
    assert len(set(groups)) > 3  # G samples of one prompt are not copies of each other

    # Stop tokens end a row early and stay as its last token.
    stop_token = expected[0][2]
    stopped = engine.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=6,
                                                          stop_token_ids=[stop_token]))
    assert stopped.rollouts[0].response_ids == expected[0][:3]
    assert stopped.rollouts[0].finish_reason == "stop"
    assert model.training is False
    return [r.response_ids for r in greedy.rollouts]


@pytest.mark.parametrize("tensor_parallel,batching", [(1, "padded"), (2, "padded"),
                                                       (2, "buckets")])
def test_embedded_engine_matches_full_recompute(tensor_parallel, batching):
    results = run_distributed(_engine_checks, tensor_parallel, args=(batching,))
    assert all(r == results[0] for r in results)  # TP ranks agree


def _stop_strings_need_decode(rank, world_size):
    from megatron_dgrpo.models.config import ParallelConfig
    from megatron_dgrpo.models.presets import get_preset
    from megatron_dgrpo.models.provider import build_gpt_model, initialize_parallel
    from megatron_dgrpo.rollout.embedded import EmbeddedEngine
    from megatron_dgrpo.rollout.engine import SamplingParams

    config = get_preset("tiny-qwen3")
    initialize_parallel(ParallelConfig(), seed=1)
    engine = EmbeddedEngine(build_gpt_model(config, ParallelConfig()), config.vocab_size)
    messages = []
    try:
        EmbeddedEngine(engine.model, config.vocab_size, batching="ragged")
    except ValueError as exc:
        messages.append(str(exc))
    for prompts, params in [([[1, 2]], SamplingParams(stop_strings=["\n"])),
                            ([[1, 2], []], SamplingParams())]:
        try:
            engine.generate(prompts, params)
        except ValueError as exc:
            messages.append(str(exc))
    return messages


def test_bad_generate_arguments_are_refused():
    [messages] = run_distributed(_stop_strings_need_decode, 1)
    assert "batching must be one of ('auto', 'padded', 'buckets'), got 'ragged'" in messages[0]
    assert "stop_strings need a decode function" in messages[1]
    assert "no prompt may be empty" in messages[2]


def _passes(buckets, lengths, new_tokens):
    return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) + new_tokens for b in buckets)


@pytest.mark.parametrize("seed", range(20))
def test_length_buckets_are_an_optimal_partition(seed):
    """Every row in exactly one bucket, and no split of the sorted lengths into consecutive
    runs needs fewer forward passes (brute force over all 2^(k-1) splits)."""
    import itertools
    import random

    from megatron_dgrpo.rollout.embedded import length_buckets

    rng = random.Random(seed)
    lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 9))]
    new_tokens = rng.randint(1, 20)
    buckets = length_buckets(lengths, new_tokens)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    distinct = sorted(set(lengths))
    best = None
    for cuts in itertools.product([False, True], repeat=len(distinct) - 1):
        runs, current = [], [distinct[0]]
        for length, cut in zip(distinct[1:], cuts):
            if cut:
                runs.append(current)
                current = []
            current.append(length)
        runs.append(current)
        cost = sum(run[-1] - run[0] + new_tokens for run in runs)
        best = cost if best is None else min(best, cost)
    assert _passes(buckets, lengths, new_tokens) == best
