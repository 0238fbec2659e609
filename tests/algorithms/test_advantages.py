"""Group-normalised advantages and per-token shaping against plain Python arithmetic."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_dgrpo.algorithms.advantages import (
    broadcast_to_tokens,
    group_advantages,
    shape_token_advantages,
)


def plain_group_advantages(rewards, group_size, scale_by_std, eps):
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / len(group))
        out += [(r - mean) / (std + eps) if scale_by_std else r - mean for r in group]
    return out


@settings(max_examples=40, deadline=None)
@given(groups=st.integers(1, 4), group_size=st.integers(1, 6), scale_by_std=st.booleans(),
       eps=st.sampled_from([1e-6, 1e-3, 0.5]), data=st.data())
def test_matches_plain_per_group_formula(groups, group_size, scale_by_std, eps, data):
    rewards = data.draw(st.lists(st.floats(-10, 10), min_size=groups * group_size,
                                 max_size=groups * group_size))
    actual = group_advantages(torch.tensor(rewards, dtype=torch.float64), group_size, scale_by_std, eps)
    expected = plain_group_advantages(rewards, group_size, scale_by_std, eps)
    assert actual.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_constant_reward_groups_and_singletons_get_zero():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 2.0])
    assert group_advantages(rewards, 3)[:3].tolist() == [0.0, 0.0, 0.0]
    assert group_advantages(rewards, 1).abs().max() == 0


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="rewards must be 1-D"):
        group_advantages(torch.zeros(2, 3), 3)
    with pytest.raises(ValueError, match="rewards contains non-finite"):
        group_advantages(torch.tensor([1.0, float("nan")]), 2)


def test_broadcast_puts_the_sequence_advantage_on_loss_tokens_only():
    mask = torch.tensor([[True, False, True], [False, False, False]])
    tokens = broadcast_to_tokens(torch.tensor([2.5, -1.0]), mask)
    assert tokens.tolist() == [[2.5, 0.0, 2.5], [0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="sequence_advantages"):
        broadcast_to_tokens(torch.zeros(3), mask)


def test_shaping_subtracts_the_scaled_log_ratio_without_gradient():
    student = torch.tensor([-1.0, -2.0], requires_grad=True)
    shaped = shape_token_advantages(torch.tensor([1.0, 0.0]), student, torch.tensor([-1.5, -0.5]), 0.4)
    assert shaped.tolist() == pytest.approx([1.0 - 0.4 * 0.5, 0.0 - 0.4 * -1.5])
    assert not shaped.requires_grad


def test_the_unbiased_group_std_divides_by_g_minus_one():
    rewards = [0.0, 1.0, 1.0, 3.0]  # one group of 4: mean 1.25
    mean = sum(rewards) / 4
    sample_std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / 3)
    actual = group_advantages(torch.tensor(rewards, dtype=torch.float64), 4, eps=1e-6,
                              unbiased_std=True)
    assert actual.tolist() == pytest.approx([(r - mean) / (sample_std + 1e-6) for r in rewards],
                                            rel=1e-12)
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.tensor([1.0, 2.0]), 1, unbiased_std=True)
