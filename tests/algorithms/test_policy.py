"""Clipped surrogate (clip-higher, dual clip) and truncated IS against plain piecewise math."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_dgrpo.algorithms.policy import (
    clipped_surrogate,
    truncated_importance_weight,
)


def plain_surrogate(log_ratio, adv, eps_low, eps_high, dual_clip):
    """(objective, d objective / d logp, clipped_low, clipped_high, dual_clipped) of one token."""
    r = math.exp(log_ratio)
    clipped_r = min(max(r, 1 - eps_low), 1 + eps_high)
    unclipped_value, clipped_value = r * adv, clipped_r * adv
    if unclipped_value <= clipped_value:
        value, grad = unclipped_value, r * adv
    else:
        value, grad = clipped_value, 0.0
    if dual_clip is not None and adv < 0 and dual_clip * adv > value:
        value, grad = dual_clip * adv, 0.0
    return (value, grad, adv < 0 and r < 1 - eps_low, adv > 0 and r > 1 + eps_high,
            dual_clip is not None and adv < 0 and r > dual_clip)


@settings(max_examples=60, deadline=None)
@given(tokens=st.lists(st.tuples(st.floats(-2.5, 2.5), st.floats(-3, 3)), min_size=1, max_size=10),
       eps_low=st.floats(0.0, 0.9), eps_high=st.floats(0.0, 2.0),
       dual_clip=st.one_of(st.none(), st.floats(1.01, 5.0)))
def test_surrogate_values_gradients_and_clip_flags(tokens, eps_low, eps_high, dual_clip):
    log_ratio = torch.tensor([lr for lr, _ in tokens], dtype=torch.float64)
    adv = torch.tensor([a for _, a in tokens], dtype=torch.float64)
    logp = log_ratio.clone().requires_grad_()
    result = clipped_surrogate(logp, torch.zeros_like(logp), adv, eps_low, eps_high, dual_clip)
    result.objective.sum().backward()
    objective = result.objective.detach()
    for i, (lr, a) in enumerate(tokens):
        value, grad, low, high, dual = plain_surrogate(lr, a, eps_low, eps_high, dual_clip)
        assert float(objective[i]) == pytest.approx(value, rel=1e-12, abs=1e-12)
        assert float(logp.grad[i]) == pytest.approx(grad, rel=1e-12, abs=1e-12)
        assert (bool(result.clipped_low[i]), bool(result.clipped_high[i]),
                bool(result.dual_clipped[i])) == (low, high, dual)
        assert float(result.ratio[i]) == pytest.approx(math.exp(lr), rel=1e-12)


def test_clip_higher_bounds_are_separate():
    adv = torch.tensor([1.0, -1.0])
    result = clipped_surrogate(torch.log(torch.tensor([1.25, 0.85])), torch.zeros(2), adv, 0.1, 0.3)
    assert result.objective.tolist() == pytest.approx([1.25, -0.9])  # high not reached, low hit
    assert result.clipped_low.tolist() == [False, True] and result.clipped_high.tolist() == [False, False]


def test_truncated_importance_weight_caps_and_reports_capped_tokens():
    trainer = torch.log(torch.tensor([1.0, 3.0, 0.5]))
    rollout = torch.zeros(3)
    weight = truncated_importance_weight(trainer, rollout, cap=2.0)
    assert weight.weight.tolist() == pytest.approx([1.0, 2.0, 0.5])
    assert weight.ratio.tolist() == pytest.approx([1.0, 3.0, 0.5])
    assert weight.capped.tolist() == [False, True, False]
    uncorrected = truncated_importance_weight(trainer, rollout, cap=None)
    assert uncorrected.weight.tolist() == [1.0, 1.0, 1.0] and not uncorrected.capped.any()
