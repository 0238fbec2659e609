"""Micro-batch planning: row groups and trimmed widths, against the mask by hand."""

import torch

from megatron_dgrpo.algorithms.inputs import TokenBatch
from megatron_dgrpo.train.microbatch import plan_micro_batches
from megatron_dgrpo.train.sequences import build_sequences


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
