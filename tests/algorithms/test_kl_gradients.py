"""What each KL estimator trains, by exact enumeration over a small vocabulary (float64).

The expected gradient of an estimator used as a loss, under the sampling distribution
``p = softmax(theta)``, is ``sum_y p(y) * grad_theta est(y)`` (``p`` itself not
differentiated: the token was sampled). The mathematics gives the reference:

* ``k1``: 0 (``E_p[grad log p] = 0``);
* ``k2``: ``grad KL(p || q)``, the reverse KL;
* ``k3``: ``grad KL(q || p)``, the forward KL (the verl / DeepSeek-R1 convention);
* ``full``: ``grad KL(p || q)`` deterministically.

Checked for the estimator functions alone and through the whole loss module (the dgrpo
objective evaluated on vocabulary-parallel terms of the logits, every token of the
vocabulary a "sampled" target weighted by its probability).
"""

from __future__ import annotations

import pytest
import torch

from megatron_dgrpo.algorithms.inputs import TokenBatch
from megatron_dgrpo.algorithms.kl import sampled_token_kl
from megatron_dgrpo.algorithms.objectives import LossConfig
from megatron_dgrpo.parallel.materialized import loss_from_logits

VOCAB = 7


def _setup(seed: int):
    gen = torch.Generator().manual_seed(seed)
    theta = (torch.randn(VOCAB, generator=gen, dtype=torch.float64) * 1.5).requires_grad_()
    logq = torch.log_softmax(torch.randn(VOCAB, generator=gen, dtype=torch.float64) * 1.5, -1)
    return theta, logq


def _grad(value: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(value, theta)
    return grad


def _reverse_kl_grad(theta, logq):
    logp = torch.log_softmax(theta, -1)
    return _grad((logp.exp() * (logp - logq)).sum(), theta)


def _forward_kl_grad(theta, logq):
    logp = torch.log_softmax(theta, -1)
    return _grad((logq.exp() * (logq - logp)).sum(), theta)


EXPECTED = {"k1": lambda theta, logq: torch.zeros(VOCAB, dtype=torch.float64),
            "k2": _reverse_kl_grad, "k3": _forward_kl_grad}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_expected_gradient_of_each_sampled_estimator(estimator, seed):
    theta, logq = _setup(seed)
    logp = torch.log_softmax(theta, -1)
    probability = logp.exp().detach()
    expected_loss = (probability * sampled_token_kl(logp, logq, estimator)).sum()
    got = _grad(expected_loss, theta)
    torch.testing.assert_close(got, EXPECTED[estimator](theta, logq), rtol=0, atol=1e-8)


def test_k1_and_k3_values_are_unbiased_for_the_reverse_kl_and_k2_is_not():
    theta, logq = _setup(3)
    logp = torch.log_softmax(theta, -1).detach()
    p = logp.exp()
    kl = float((p * (logp - logq)).sum())
    mean = {e: float((p * sampled_token_kl(logp, logq, e)).sum()) for e in ("k1", "k2", "k3")}
    assert mean["k1"] == pytest.approx(kl, abs=1e-12)
    assert mean["k3"] == pytest.approx(kl, abs=1e-12)
    assert abs(mean["k2"] - kl) > 1e-3


def _loss_module_gradient(config: LossConfig, theta, logq) -> torch.Tensor:
    """Gradient w.r.t. the logits ``theta`` of the dgrpo loss (zero advantages: only the
    teacher-KL term acts) taken in expectation over the sampled token: one row per token
    of the vocabulary, weighted by its probability."""
    logits = theta.expand(VOCAB, VOCAB)
    mask = torch.ones(VOCAB, dtype=torch.bool)
    batch = TokenBatch(loss_mask=mask, weights=torch.softmax(theta, -1).detach(),
                       targets=torch.arange(VOCAB), advantages=torch.zeros(VOCAB,
                                                                           dtype=torch.float64),
                       teacher_logp=logq)
    teacher_logits = logq.expand(VOCAB, VOCAB) if config.resolved_kl_estimator == "full" else None
    loss, _ = loss_from_logits(config, batch, logits, teacher_logits)
    return _grad(loss, theta)


@pytest.mark.parametrize("estimator, kl", [("k2", "reverse"), ("k3", "forward"),
                                           ("full", "reverse")])
def test_the_dgrpo_loss_trains_the_kl_its_estimator_gives(estimator, kl):
    theta, logq = _setup(4)
    config = LossConfig(objective="dgrpo", kl_coef=0.5, kl_estimator=estimator)
    expected = (_reverse_kl_grad if kl == "reverse" else _forward_kl_grad)(theta, logq)
    got = _loss_module_gradient(config, theta, logq)
    torch.testing.assert_close(got, 0.5 * expected, rtol=0, atol=1e-8)


def test_k1_as_a_loss_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="zero expected gradient"):
        LossConfig(objective="dgrpo", kl_estimator="k1").validate()
    LossConfig(objective="dgrpo", kl_estimator="k1", form="advantage").validate()


def test_k3_is_labelled_as_the_verl_convention():
    (note,) = LossConfig(objective="grpo", kl_estimator="k3", kl_coef=0.1).notices()
    assert "verl" in note and "forward KL" in note
    assert LossConfig(objective="grpo").notices() == []
