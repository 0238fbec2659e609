"""Aggregation weights: token-mean and sequence-mean from global counts."""

import pytest
import torch

from megatron_dgrpo.algorithms.aggregation import token_weights

MASK = torch.tensor([[True, True, False], [False, False, False], [True, False, False]])


def test_token_mean_divides_by_the_global_token_count():
    local = token_weights(MASK, "token_mean", dtype=torch.float64)
    assert local.tolist() == [[1 / 3, 1 / 3, 0], [0, 0, 0], [1 / 3, 0, 0]]
    global_ = token_weights(MASK, "token_mean", global_token_count=torch.tensor(12), dtype=torch.float64)
    assert global_.tolist() == [[1 / 12, 1 / 12, 0], [0, 0, 0], [1 / 12, 0, 0]]


def test_seq_mean_weights_each_nonempty_sequence_equally():
    local = token_weights(MASK, "seq_mean", dtype=torch.float64)
    assert local.tolist() == [[1 / 4, 1 / 4, 0], [0, 0, 0], [1 / 2, 0, 0]]
    global_ = token_weights(MASK, "seq_mean", sequence_token_counts=torch.tensor([4, 0, 1]),
                            global_sequence_count=torch.tensor(5), dtype=torch.float64)
    assert global_.tolist() == [[1 / 20, 1 / 20, 0], [0, 0, 0], [1 / 5, 0, 0]]


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_an_all_masked_batch_gets_zero_weights_not_nan(aggregation):
    weights = token_weights(torch.zeros(2, 3, dtype=torch.bool), aggregation)
    assert weights.tolist() == [[0.0] * 3] * 2


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="unknown aggregation 'mean'"):
        token_weights(MASK, "mean")
    with pytest.raises(ValueError, match="loss_mask must be a bool"):
        token_weights(MASK.float(), "token_mean")
    with pytest.raises(ValueError, match="sequence_token_counts"):
        token_weights(MASK, "seq_mean", sequence_token_counts=torch.tensor([1, 2]))


def test_constant_length_weights_every_token_by_rows_times_the_constant():
    # Dr. GRPO: 1 / (S * L) whatever the response's length; S counts every row (empty too)
    local = token_weights(MASK, "constant_length", length_norm=4, dtype=torch.float64)
    assert local.tolist() == [[1 / 12, 1 / 12, 0], [0, 0, 0], [1 / 12, 0, 0]]
    global_ = token_weights(MASK, "constant_length", global_sequence_count=torch.tensor(6),
                            length_norm=4, dtype=torch.float64)
    assert global_.tolist() == [[1 / 24, 1 / 24, 0], [0, 0, 0], [1 / 24, 0, 0]]
    with pytest.raises(ValueError, match="needs length_norm > 0"):
        token_weights(MASK, "constant_length")
