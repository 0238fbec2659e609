"""Per-family rollout metrics against hand-computed values."""

import math

import pytest

from megatron_dgrpo.train.rollout_metrics import family_of, rollout_metrics


def test_per_family_rewards_pass_rates_and_lengths():
    rewards = [1.0, 0.0, 0.5, 1.0, 0.0, 0.0]
    families = ["needle", "needle", "needle", "code", "code", "longblocks:web"]
    metrics = rollout_metrics(rewards, families, lengths=[3, 5, 7, 2, 8, 1],
                              truncated=[False, True, False, False, True, True])
    assert metrics["reward/mean"] == pytest.approx(2.5 / 6)
    assert metrics["reward/std"] == pytest.approx(math.sqrt(sum((r - 2.5 / 6) ** 2 for r in rewards) / 6))
    assert metrics["reward/pass_rate"] == pytest.approx(2 / 6)
    assert metrics["reward/needle/mean"] == pytest.approx(0.5)
    assert metrics["reward/needle/std"] == pytest.approx(math.sqrt((0.25 + 0.25 + 0) / 3))
    assert metrics["pass_rate/needle"] == pytest.approx(1 / 3)
    assert metrics["pass_rate/code"] == pytest.approx(0.5)
    assert metrics["reward/longblocks:web/std"] == 0.0
    assert metrics["pass_rate/longblocks:web"] == 0.0
    assert metrics["response/length_mean"] == pytest.approx(26 / 6)
    assert metrics["response/length_max"] == 8
    assert metrics["response/truncated_frac"] == pytest.approx(0.5)


def test_family_names_and_bad_input():
    assert family_of({"task_family": "needle"}, "synthetic") == "needle"
    assert family_of({}, "wikipedia") == "longblocks:wikipedia"
    with pytest.raises(ValueError, match="same non-zero number"):
        rollout_metrics([1.0], ["a", "b"], [1], [False])
