"""Micro-batch planning: row groups and trimmed widths, against the mask by hand."""

import pytest
import torch

from megatron_dgrpo.algorithms.inputs import TokenBatch
from megatron_dgrpo.train.batch import plan_micro_batches
from megatron_dgrpo.rollout.sequences import build_sequences


def test_rows_are_grouped_and_trimmed_to_their_last_loss_position():
    batch = build_sequences([[1, 2], [3], [4, 5, 6]], [[7, 8, 9, 10], [11], [12]])
    # loss positions: row 0: 1..4, row 1: 0, row 2: 2 (width of the padded batch: 6)
    plan = plan_micro_batches(batch.loss_mask, 2)
    assert [(m.start, m.stop, m.width) for m in plan] == [(0, 2, 5), (2, 3, 3)]
    assert plan_micro_batches(batch.loss_mask, None)[0].width == 5
    assert plan_micro_batches(torch.zeros(2, 4, dtype=torch.bool), 1)[0].width == 1

    second = plan[1].sequences(batch)
    assert second.tokens.tolist() == [[4, 5, 6]] and second.targets.tolist() == [[5, 6, 12]]
    tokens = TokenBatch(loss_mask=batch.loss_mask, weights=torch.ones(3, 6), targets=batch.targets,
                        teacher_topk_indices=torch.zeros(3, 6, 4, dtype=torch.long))
    part = plan[0].tokens(tokens)
    assert part.weights.shape == (2, 5) and part.teacher_topk_indices.shape == (2, 5, 4)
    assert part.advantages is None


def test_context_parallel_micro_batches_hand_out_aligned_load_balanced_shards():
    # Longest sequence 6 tokens -> width 8 with align 4 (2 chunks per rank of CP=2).
    batch = build_sequences([[1, 2], [3]], [[7, 8, 9, 10], [11]], align=4)
    assert batch.tokens.shape == (2, 8) and not batch.loss_mask[:, 6:].any()
    rank0, rank1 = (plan_micro_batches(batch.loss_mask, 1, 4, rank, 2) for rank in (0, 1))
    # Row 0's last loss position is 4 -> width 5 -> 8; row 1's is 0 -> width 1 -> 4.
    assert [m.width for m in rank0] == [8, 4]
    # Width 8 = chunks of 2: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    # Row 0 = [1, 2 | 7, 8 | 9, 10 | pad, pad].
    assert rank0[0].sequences(batch).tokens.tolist() == [[1, 2, 0, 0]]
    assert rank0[0].sequences(batch).positions.tolist() == [[0, 1, 6, 7]]
    assert rank1[0].sequences(batch).tokens.tolist() == [[7, 8, 9, 10]]
    assert rank1[0].sequences(batch).positions.tolist() == [[2, 3, 4, 5]]
    tokens = TokenBatch(loss_mask=batch.loss_mask, weights=torch.arange(16.).reshape(2, 8),
                        targets=batch.targets,
                        teacher_topk_indices=torch.zeros(2, 8, 3, dtype=torch.long))
    part = rank1[1].tokens(tokens)
    assert part.weights.tolist() == [[9.0, 10.0]] and part.teacher_topk_indices.shape == (1, 2, 3)


def test_alignment_that_does_not_fit_context_parallelism_is_refused():
    batch = build_sequences([[1, 2]], [[3]], align=2)
    with pytest.raises(ValueError, match="align % 4 == 0"):
        plan_micro_batches(batch.loss_mask, None, 2, 0, 2)
