"""Next-token sampling against brute-force references written out here."""

import math

import pytest
import torch

from megatron_dgrpo.rollout.engine import SamplingParams
from megatron_dgrpo.rollout.sampling import restrict, sample_next, scaled_logprobs


def _allowed_reference(probs: list[float], top_k: int, top_p: float) -> set[int]:
    """Tokens a top-k then top-p sampler may draw, by plain sorting (ties by index)."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    if 0 < top_k < len(probs):
        order = order[:top_k]
    total = sum(probs[i] for i in order)
    kept, mass = [], 0.0
    for i in order:
        if kept and mass >= top_p * total - 1e-12:
            break
        kept.append(i)
        mass += probs[i]
    return set(kept)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (0, 0.5), (4, 0.7), (1, 0.9)])
def test_restrict_keeps_exactly_the_reference_set(top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(5, 11, dtype=torch.float64) * 2
    logprobs = scaled_logprobs(logits, 1.0)
    kept = torch.isfinite(restrict(logprobs, top_k, top_p))
    for row in range(logits.shape[0]):
        # The nucleus is taken over the renormalised top-k distribution.
        probs = logprobs[row].exp().tolist()
        if 0 < top_k < len(probs):
            cutoff = sorted(probs, reverse=True)[top_k - 1]
            probs = [p if p >= cutoff else 0.0 for p in probs]
        expected = _allowed_reference([p / sum(probs) for p in probs], top_k, top_p)
        assert set(torch.nonzero(kept[row]).flatten().tolist()) == expected


def test_scaled_logprobs_use_temperature_and_greedy_reports_raw():
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    for temperature in (0.5, 2.0):
        expected = [x / temperature - math.log(sum(math.exp(y / temperature) for y in (1.0, 2.0, 0.5)))
                    for x in (1.0, 2.0, 0.5)]
        assert scaled_logprobs(logits, temperature)[0].tolist() == pytest.approx(expected, abs=1e-6)
    tokens, lp = sample_next(logits, 0.0, 0, 1.0, None)
    assert tokens.tolist() == [1]
    assert lp.item() == pytest.approx(2.0 - math.log(math.exp(1) + math.exp(2) + math.exp(0.5)), abs=1e-6)


def test_sample_frequencies_follow_the_restricted_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]]).expand(20000, -1)
    gen = torch.Generator().manual_seed(1)
    tokens, lp = sample_next(logits, 1.0, 3, 1.0, gen)
    counts = torch.bincount(tokens, minlength=5).double() / tokens.numel()
    top3 = torch.softmax(torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64), 0)
    assert counts[3:].sum() == 0
    assert torch.allclose(counts[:3], top3, atol=0.015)
    # The reported log-prob is the untruncated one, whatever top-k did.
    full = torch.log_softmax(torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0]), 0)
    assert torch.allclose(lp, full[tokens], atol=1e-6)


def test_same_seed_same_draws():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    a = sample_next(logits, 0.8, 0, 0.9, torch.Generator().manual_seed(7))[0]
    b = sample_next(logits, 0.8, 0, 0.9, torch.Generator().manual_seed(7))[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("field, value, message", [
    ("n", 0, "sampling.n"), ("temperature", -1.0, "sampling.temperature"),
    ("top_p", 0.0, "sampling.top_p"), ("top_k", -2, "sampling.top_k"),
    ("max_new_tokens", 0, "sampling.max_new_tokens")])
def test_bad_sampling_params_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value}).validate()
