"""The learning-rate schedule against values computed by hand."""

import math

import pytest

from megatron_dgrpo.train.schedule import learning_rate


def test_warmup_then_cosine_then_floor():
    values = [learning_rate(k, 1.0, warmup_steps=2, decay="cosine", decay_steps=4, min_lr=0.1)
              for k in range(1, 9)]
    expected = [0.5, 1.0] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)) for p in (0.25, 0.5, 0.75, 1.0)] \
        + [0.1, 0.1]
    assert values == pytest.approx(expected)


def test_linear_and_constant():
    assert learning_rate(3, 2.0, decay="linear", decay_steps=4) == pytest.approx(2.0 * (1 - 3 / 4))
    assert [learning_rate(k, 3e-6) for k in (1, 100)] == [3e-6, 3e-6]
    with pytest.raises(ValueError, match="unknown decay"):
        learning_rate(1, 1.0, decay="step")


def test_run_config_schedule_defaults_to_the_end_of_the_run():
    from megatron_dgrpo.train.config import OptimConfig

    optim = OptimConfig(lr=1.0, warmup_steps=1, decay="linear", min_lr=0.0)
    assert [optim.lr_at(k, total_steps=5) for k in range(1, 6)] == pytest.approx([1, 0.75, 0.5, 0.25, 0])
    with pytest.raises(ValueError, match="min_lr"):
        OptimConfig(lr=1e-6, min_lr=1e-5).validate()
