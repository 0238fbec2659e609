"""Load-balanced CP sharding, and CP=2 losses on real gloo ranks against the plain reference."""

import pytest
import torch
import torch.distributed as dist
from cases import (
    SETTINGS,
    case_batch,
    make_case,
    map_tokens,
    plain_reference,
    portable,
    relative_error,
    teacher_inputs,
)

from megatron_dgrpo.algorithms import token_weights
from megatron_dgrpo.parallel.context import (
    cp_shard,
    cp_unshard,
    global_sequence_count,
    global_token_count,
    sequence_alignment,
    sequence_token_counts,
)
from megatron_dgrpo.parallel.fused import loss_from_hidden
from megatron_dgrpo.parallel.materialized import loss_from_logits
from megatron_dgrpo.parallel.launch import run_distributed

LOSS_RTOL, GRAD_RTOL = 1e-6, 1e-5


def test_rank_r_holds_chunks_r_and_mirror():
    sequence = torch.arange(12).reshape(1, 12)  # cp=3: six chunks of two tokens
    assert cp_shard(sequence, 0, 3).tolist() == [[0, 1, 10, 11]]
    assert cp_shard(sequence, 1, 3).tolist() == [[2, 3, 8, 9]]
    assert cp_shard(sequence, 2, 3).tolist() == [[4, 5, 6, 7]]


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_unshard_inverts_shard_along_any_dim(cp_size):
    tensor = torch.randn(3, 16, 8)
    for dim in (1, 2):
        shards = [cp_shard(tensor, rank, cp_size, seq_dim=dim) for rank in range(cp_size)]
        assert all(s.shape[dim] == tensor.shape[dim] // cp_size for s in shards)
        assert torch.equal(cp_unshard(shards, seq_dim=dim), tensor)


def test_indivisible_length_and_bad_rank_are_rejected():
    with pytest.raises(ValueError, match="divisible by 2 \\* cp_size = 4"):
        cp_shard(torch.zeros(1, 6), 0, 2)
    with pytest.raises(ValueError, match="cp_rank 2"):
        cp_shard(torch.zeros(1, 8), 2, 2)


def test_counts_without_parallelism_are_plain_sums():
    masks = [torch.tensor([[True, False, True], [False, False, False]]),
             torch.tensor([[True, True, True]])]
    assert int(global_token_count(masks)) == 5
    assert int(global_sequence_count(masks)) == 2
    assert sequence_token_counts(masks[0]).tolist() == [2, 0]


def _every_objective_on_sequence_shards(rank, world_size, case, chunk_tokens):
    torch.set_num_threads(1)
    group = dist.group.WORLD
    local = map_tokens(case, lambda t: cp_shard(t, rank, world_size, seq_dim=1))
    mask = local["loss_mask"]
    counts = {"global_token_count": global_token_count(mask, cp_group=group),
              "sequence_token_counts": sequence_token_counts(mask, cp_group=group),
              "global_sequence_count": global_sequence_count(mask, cp_group=group)}
    results = {"counts": counts}
    for setting, (config, teacher) in SETTINGS.items():
        weights = token_weights(mask, config.aggregation, dtype=torch.float64, **counts)
        batch = case_batch(local, teacher, weights)
        teacher_hidden, teacher_weight = teacher_inputs(local, teacher)
        outputs = {}
        for path in ("materialized", "fused"):
            hidden = local["student_hidden"].clone().requires_grad_()
            weight = local["student_weight"].clone().requires_grad_()
            if path == "materialized":
                teacher_logits = None if teacher_hidden is None else teacher_hidden @ teacher_weight.T
                loss, _ = loss_from_logits(config, batch, hidden @ weight.T, teacher_logits)
            else:
                loss, _ = loss_from_hidden(config, batch, hidden, weight, teacher_hidden,
                                           teacher_weight, chunk_tokens=chunk_tokens)
            loss.backward()
            outputs[path] = (loss.detach(), hidden.grad, weight.grad)
        results[setting] = outputs
    return portable(results)


@pytest.mark.multiproc
def test_cp2_shard_losses_sum_to_the_reference_and_grads_unshard_to_it():
    case = make_case(seed=3, batch_size=4, seq_len=8, vocab=13)
    per_rank = run_distributed(_every_objective_on_sequence_shards, 2, args=(case, 3))
    mask = case["loss_mask"]
    for rank_results in per_rank:
        counts = rank_results["counts"]
        assert int(counts["global_token_count"]) == int(mask.sum())
        assert counts["sequence_token_counts"].tolist() == mask.sum(1).tolist()
        assert int(counts["global_sequence_count"]) == int((mask.sum(1) > 0).sum())
    for setting, (config, teacher) in SETTINGS.items():
        ref_loss, ref_grad_hidden, ref_grad_weight = plain_reference(case, config, teacher)
        for path in ("materialized", "fused"):
            parts = [[torch.from_numpy(x) for x in r[setting][path]] for r in per_rank]
            what = f"{setting} {path} CP=2"
            assert relative_error(parts[0][0] + parts[1][0], ref_loss) < LOSS_RTOL, what
            grad_hidden = cp_unshard([parts[0][1], parts[1][1]], seq_dim=1)
            assert relative_error(grad_hidden, ref_grad_hidden) < GRAD_RTOL, what
            assert relative_error(parts[0][2] + parts[1][2], ref_grad_weight) < GRAD_RTOL, what


@pytest.mark.parametrize("cp_size, tp_size, sequence_parallel, expected", [
    (1, 4, False, 1), (2, 4, False, 4), (4, 8, True, 64), (1, 4, True, 4)])
def test_sequence_alignment(cp_size, tp_size, sequence_parallel, expected):
    assert sequence_alignment(cp_size, tp_size, sequence_parallel) == expected
