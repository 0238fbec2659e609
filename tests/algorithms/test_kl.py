"""KL estimators against plain Python math."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_dgrpo.algorithms.kl import full_vocab_kl, sampled_token_kl, topk_kl

logprobs = st.floats(-20.0, 0.0)


@settings(max_examples=50, deadline=None)
@given(pairs=st.lists(st.tuples(logprobs, logprobs), min_size=1, max_size=8))
def test_sampled_estimators_follow_their_definitions(pairs):
    logp = torch.tensor([p for p, _ in pairs], dtype=torch.float64)
    logq = torch.tensor([q for _, q in pairs], dtype=torch.float64)
    k1 = [p - q for p, q in pairs]
    k2 = [(p - q) ** 2 / 2 for p, q in pairs]
    k3 = [math.exp(q - p) - (q - p) - 1 for p, q in pairs]
    assert sampled_token_kl(logp, logq, "k1").tolist() == pytest.approx(k1, rel=1e-12, abs=1e-12)
    assert sampled_token_kl(logp, logq, "k2").tolist() == pytest.approx(k2, rel=1e-12, abs=1e-12)
    assert sampled_token_kl(logp, logq, "k3").tolist() == pytest.approx(k3, rel=1e-9, abs=1e-12)
    assert (sampled_token_kl(logp, logq, "k3") >= 0).all()


def test_unknown_sampled_estimator_is_rejected_by_name():
    with pytest.raises(ValueError, match="'k4'"):
        sampled_token_kl(torch.zeros(1), torch.zeros(1), "k4")


def plain_kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def random_distribution(gen, size):
    return torch.softmax(torch.randn(size, generator=gen, dtype=torch.float64) * 2, -1)


def test_full_vocab_kl_is_the_plain_sum():
    gen = torch.Generator().manual_seed(0)
    p, q = random_distribution(gen, 7), random_distribution(gen, 7)
    assert float(full_vocab_kl(p.log(), q.log())) == pytest.approx(plain_kl(p.tolist(), q.tolist()), rel=1e-12)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_topk_with_tail_bucket_is_kl_over_k_plus_one_categories(k):
    gen = torch.Generator().manual_seed(k)
    p, q = random_distribution(gen, 9), random_distribution(gen, 9)
    ids = torch.randperm(9, generator=gen)[:k]
    p_k, q_k = p[ids].tolist(), q[ids].tolist()
    expected = plain_kl(p_k + [1 - sum(p_k)], q_k + [1 - sum(q_k)])
    assert float(topk_kl(p[ids].log(), q[ids].log(), "bucket")) == pytest.approx(expected, rel=1e-10)
    p_norm, q_norm = [x / sum(p_k) for x in p_k], [x / sum(q_k) for x in q_k]
    renormalized = float(topk_kl(p[ids].log(), q[ids].log(), "renormalize"))
    assert renormalized == pytest.approx(plain_kl(p_norm, q_norm), rel=1e-10, abs=1e-14)


def test_topk_over_the_whole_vocabulary_equals_the_full_kl():
    gen = torch.Generator().manual_seed(4)
    p, q = random_distribution(gen, 6), random_distribution(gen, 6)
    assert float(topk_kl(p.log(), q.log())) == pytest.approx(float(full_vocab_kl(p.log(), q.log())), rel=1e-9)


def test_unknown_tail_is_rejected_by_name():
    with pytest.raises(ValueError, match="'drop'"):
        topk_kl(torch.zeros(1, 2), torch.zeros(1, 2), "drop")
