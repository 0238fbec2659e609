"""DP=2 with two microbatches per rank, and single-process microbatch splits: losses and
gradients summed over the pieces equal the plain reference; metrics combine exactly."""

import pytest
import torch
import torch.distributed as dist
from cases import (
    SETTINGS,
    case_batch,
    make_case,
    plain_reference,
    portable,
    relative_error,
    teacher_inputs,
)

from megatron_dgrpo.algorithms import LossMetrics, token_weights
from megatron_dgrpo.parallel.context import (
    all_reduce_metrics,
    global_sequence_count,
    global_token_count,
)
from megatron_dgrpo.parallel.fused import loss_from_hidden
from megatron_dgrpo.parallel.materialized import loss_from_logits
from megatron_dgrpo.parallel.launch import run_distributed

LOSS_RTOL, GRAD_RTOL = 1e-6, 1e-5


def accumulate_microbatches(case, setting, row_slices, path, dp_group=None):
    """Loss summed over microbatches (rows of ``case``), gradients accumulated as in a
    training step, and the microbatch-merged metrics."""
    config, teacher = SETTINGS[setting]
    masks = [case["loss_mask"][rows] for rows in row_slices]
    token_count = global_token_count(masks, dp_group=dp_group)
    sequence_count = global_sequence_count(masks, dp_group=dp_group)
    hidden = case["student_hidden"].clone().requires_grad_()
    weight = case["student_weight"].clone().requires_grad_()
    total, metrics = torch.zeros((), dtype=torch.float64), LossMetrics()
    for rows in row_slices:
        weights = token_weights(case["loss_mask"][rows], config.aggregation, token_count, None,
                                sequence_count, dtype=torch.float64)
        batch = case_batch(case, teacher, weights, rows=rows)
        teacher_hidden, teacher_weight = teacher_inputs(case, teacher, rows=rows)
        if path == "materialized":
            teacher_logits = None if teacher_hidden is None else teacher_hidden @ teacher_weight.T
            loss, piece = loss_from_logits(config, batch, hidden[rows] @ weight.T, teacher_logits)
        else:
            loss, piece = loss_from_hidden(config, batch, hidden[rows], weight, teacher_hidden,
                                           teacher_weight, chunk_tokens=4)
        loss.backward()
        total, metrics = total + loss.detach(), metrics.merge(piece)
    return total, hidden.grad, weight.grad, metrics


def _two_microbatches_per_dp_rank(rank, world_size, case):
    torch.set_num_threads(1)
    group = dist.group.WORLD
    rows_per_rank = case["loss_mask"].shape[0] // world_size
    first = rank * rows_per_rank
    microbatches = [slice(first, first + 1), slice(first + 1, first + rows_per_rank)]
    results = {}
    for setting in SETTINGS:
        for path in ("materialized", "fused"):
            loss, grad_hidden, grad_weight, metrics = accumulate_microbatches(
                case, setting, microbatches, path, dp_group=group)
            global_metrics = all_reduce_metrics(metrics, group).as_dict()
            rows = slice(first, first + rows_per_rank)
            results[setting, path] = (loss, grad_hidden[rows], grad_weight, global_metrics)
    return portable(results)


@pytest.mark.multiproc
def test_dp2_with_microbatches_matches_reference_and_single_process_metrics():
    case = make_case(seed=21, batch_size=6, seq_len=5, vocab=11, group_size=3)
    per_rank = run_distributed(_two_microbatches_per_dp_rank, 2, args=(case,))
    for setting, (config, teacher) in SETTINGS.items():
        ref_loss, ref_grad_hidden, ref_grad_weight = plain_reference(case, config, teacher)
        *_, whole_metrics = accumulate_microbatches(case, setting, [slice(None)], "materialized")
        for path in ("materialized", "fused"):
            what = f"{setting} {path} DP=2 x 2 microbatches"
            parts = [r[setting, path] for r in per_rank]
            loss = sum(float(p[0]) for p in parts)
            assert relative_error(torch.tensor(loss), ref_loss) < LOSS_RTOL, what
            grad_hidden = torch.cat([torch.from_numpy(p[1]) for p in parts])
            assert relative_error(grad_hidden, ref_grad_hidden) < GRAD_RTOL, what
            grad_weight = sum(torch.from_numpy(p[2]) for p in parts)
            assert relative_error(grad_weight, ref_grad_weight) < GRAD_RTOL, what
            for rank_metrics in (parts[0][3], parts[1][3]):
                assert rank_metrics == pytest.approx(whole_metrics.as_dict(), rel=1e-9, abs=1e-12), what


@pytest.mark.parametrize("setting", ["dgrpo_full", "grpo_k3_dual_seq", "kd_topk_renorm_seq"])
def test_single_process_microbatch_splits_match_reference(setting):
    case = make_case(seed=8, batch_size=5, seq_len=6, vocab=9, group_size=5)
    config, teacher = SETTINGS[setting]
    ref_loss, ref_grad_hidden, ref_grad_weight = plain_reference(case, config, teacher)
    for path in ("materialized", "fused"):
        loss, grad_hidden, grad_weight, _ = accumulate_microbatches(
            case, setting, [slice(0, 2), slice(2, 3), slice(3, 5)], path)
        assert relative_error(loss, ref_loss) < LOSS_RTOL
        assert relative_error(grad_hidden, ref_grad_hidden) < GRAD_RTOL
        assert relative_error(grad_weight, ref_grad_weight) < GRAD_RTOL
