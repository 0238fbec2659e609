"""Packed micro-batches (train/packing.py) on hand-made batches: which rows go into which
pack (first-fit decreasing, a row over the budget alone, rows without loss tokens left out),
the THD layout each pack gathers (tokens, restarting positions, loss mask off on alignment
padding, cu_seqlens), and that per-token results scattered back land on their rows."""

import pytest
import torch

from megatron_dgrpo.algorithms.inputs import TokenBatch
from megatron_dgrpo.rollout.sequences import build_sequences
from megatron_dgrpo.train.batch import used_lengths
from megatron_dgrpo.train.packing import PackedMicroBatch, plan_packed_micro_batches

# rows' prompt / response lengths: used lengths (last loss position + 1) are 5, 0, 3, 7, 2
PROMPTS = [[1, 2], [3, 4, 5], [6], [7, 8, 9, 10], [11]]
RESPONSES = [[20, 21, 22, 23], [], [24, 25, 26], [27, 28, 29, 30], [31, 32]]


def _batch():
    return build_sequences(PROMPTS, RESPONSES)


def test_used_lengths_end_at_the_last_loss_position():
    assert used_lengths(_batch().loss_mask) == [5, 0, 3, 7, 2]


def test_rows_go_first_fit_decreasing_and_a_long_row_alone():
    mask = _batch().loss_mask
    plan = plan_packed_micro_batches(mask, 8)
    # 7 opens pack A (1 left), 5 opens B (3 left), 3 fills B, 2 fits neither: C
    assert [(p.rows, p.lengths) for p in plan] == [((3,), (7,)), ((0, 2), (5, 3)), ((4,), (2,))]
    plan = plan_packed_micro_batches(mask, 6)  # row 3 (7 tokens) is over the budget
    assert [(p.rows, p.lengths) for p in plan] == [((0,), (5,)), ((2, 4), (3, 2)), ((3,), (7,))]
    whole = plan_packed_micro_batches(mask, None, align=4)
    assert [(p.rows, p.offsets) for p in whole] == [((3, 0, 2, 4), (0, 8, 16, 20, 24))]
    nothing = plan_packed_micro_batches(torch.zeros(3, 4, dtype=torch.bool), 8)
    assert [(p.rows, p.lengths) for p in nothing] == [((0,), (1,))]


def test_a_pack_gathers_the_thd_layout_and_scatters_back():
    batch = _batch()
    pack = PackedMicroBatch(rows=(0, 2), lengths=(5, 3), align=4)
    part = pack.sequences(batch)
    assert part.tokens.tolist() == [[1, 2, 20, 21, 22, 0, 0, 0, 6, 24, 25, 0]]
    assert part.positions.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]]
    assert part.targets.tolist() == [[2, 20, 21, 22, 23, 0, 0, 0, 24, 25, 26, 0]]
    assert part.loss_mask.tolist() == [[False, True, True, True, True, False, False, False,
                                        True, True, True, False]]
    thd = pack.stage_input(part).packed
    assert thd.qkv_format == "thd" and thd.max_seqlen_q == thd.max_seqlen_kv == 8
    assert thd.cu_seqlens_q.tolist() == [0, 5, 8] and thd.cu_seqlens_q_padded.tolist() == [0, 8, 12]

    values = torch.arange(batch.loss_mask.numel(), dtype=torch.float32).view(
        batch.loss_mask.shape) + 1
    topk = torch.stack([values, -values], dim=-1)  # a [B, T, K] signal keeps its K
    signals = TokenBatch(loss_mask=batch.loss_mask, weights=values, targets=batch.targets,
                         teacher_topk_indices=batch.targets[..., None].expand(-1, -1, 2),
                         teacher_topk_logp=topk)
    packed = pack.tokens(signals)
    assert torch.equal(packed.loss_mask, part.loss_mask)
    assert packed.teacher_topk_logp.shape == (1, 12, 2)
    real = torch.tensor([True] * 5 + [False] * 3 + [True] * 3 + [False])  # not alignment padding
    width = batch.loss_mask.shape[1]
    expected = [row * width + position for row, length in ((0, 5), (2, 3))
                for position in range(length)]
    assert (packed.weights[0][real] - 1).tolist() == expected
    assert torch.equal(packed.teacher_topk_logp[0, :, 1], -packed.weights[0])

    out = torch.zeros_like(values)
    pack.place(out, packed.weights)
    kept = torch.zeros_like(batch.loss_mask)
    kept[0, :5], kept[2, :3] = True, True
    assert torch.equal(out, torch.where(kept, values, 0.0))


def test_a_pack_over_two_context_parallel_ranks_holds_two_chunks_of_each_sequence():
    """Megatron's THD context-parallel layout, written out by hand: each sequence (padded to
    a multiple of 2 x CP = 4) is cut into 4 chunks, rank 0 holds chunks 0 and 3 of each,
    rank 1 chunks 1 and 2; the shards put back together are the CP=1 pack."""
    from megatron_dgrpo.parallel.context import cp_unshard_segments

    batch = _batch()
    whole = PackedMicroBatch(rows=(0, 2), lengths=(5, 3), align=4).sequences(batch)
    packs = [PackedMicroBatch(rows=(0, 2), lengths=(5, 3), align=4, cp_rank=rank, cp_size=2)
             for rank in range(2)]
    shards = [pack.sequences(batch) for pack in packs]
    # sequence 0 = [1, 2, 20, 21 | 22, 0, 0, 0] (chunks of 2), sequence 1 = [6, 24, 25, 0]
    assert [s.tokens.tolist() for s in shards] == [[[1, 2, 0, 0, 6, 0]],
                                                   [[20, 21, 22, 0, 24, 25]]]
    assert [s.positions.tolist() for s in shards] == [[[0, 1, 6, 7, 0, 3]],
                                                      [[2, 3, 4, 5, 1, 2]]]
    for name in ("tokens", "positions", "targets", "loss_mask"):
        assert torch.equal(cp_unshard_segments([getattr(s, name) for s in shards], (0, 8, 12)),
                           getattr(whole, name)), name
    thd = packs[1].stage_input(shards[1]).packed  # boundaries of the whole sequences
    assert thd.cu_seqlens_q_padded.tolist() == [0, 8, 12]
    with pytest.raises(ValueError, match="multiple of 4"):
        PackedMicroBatch(rows=(0,), lengths=(5,), align=2, cp_rank=0, cp_size=2)
