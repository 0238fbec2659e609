"""TP=2 and TP=4: vocabulary-sharded logits and output weights on real gloo ranks, for every
objective, materialized and fused, against the single-process plain float64 reference."""

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

from megatron_dgrpo.algorithms import token_weights
from megatron_dgrpo.parallel.fused import loss_from_hidden
from megatron_dgrpo.parallel.materialized import loss_from_logits
from megatron_dgrpo.parallel.launch import run_distributed

pytestmark = pytest.mark.multiproc
LOSS_RTOL, GRAD_RTOL = 1e-6, 1e-5


def _every_objective_on_vocab_shards(rank, world_size, case, chunk_tokens):
    torch.set_num_threads(1)
    group = dist.group.WORLD
    local_vocab = case["student_weight"].shape[0] // world_size
    shard = slice(rank * local_vocab, (rank + 1) * local_vocab)
    results = {}
    for setting, (config, teacher) in SETTINGS.items():
        weights = token_weights(case["loss_mask"], config.aggregation, dtype=torch.float64)
        batch = case_batch(case, teacher, weights)
        teacher_hidden, teacher_weight = teacher_inputs(case, teacher)
        teacher_shard = None if teacher_weight is None else teacher_weight[shard]

        hidden = case["student_hidden"].clone().requires_grad_()
        weight = case["student_weight"][shard].clone().requires_grad_()
        teacher_logits = None if teacher_hidden is None else teacher_hidden @ teacher_shard.T
        loss, _ = loss_from_logits(config, batch, hidden @ weight.T, teacher_logits, tp_group=group)
        loss.backward()
        dist.all_reduce(hidden.grad, group=group)  # Megatron's column-parallel input gradient
        materialized = (loss.detach(), hidden.grad, weight.grad)

        hidden = case["student_hidden"].clone().requires_grad_()
        weight = case["student_weight"][shard].clone().requires_grad_()
        loss, _ = loss_from_hidden(config, batch, hidden, weight, teacher_hidden, teacher_shard,
                                   tp_group=group, chunk_tokens=chunk_tokens)
        loss.backward()
        results[setting] = {"materialized": materialized,
                            "fused": (loss.detach(), hidden.grad, weight.grad)}
    return portable(results)


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_sharded_losses_and_grads_match_single_process_reference(tp):
    case = make_case(seed=5 + tp, batch_size=4, seq_len=6, vocab=24, hidden=5)
    per_rank = run_distributed(_every_objective_on_vocab_shards, tp, args=(case, 5))
    local_vocab = 24 // tp
    for setting, (config, teacher) in SETTINGS.items():
        ref_loss, ref_grad_hidden, ref_grad_weight = plain_reference(case, config, teacher)
        for rank, results in enumerate(per_rank):
            shard = slice(rank * local_vocab, (rank + 1) * local_vocab)
            for path, (loss, grad_hidden, grad_weight) in results[setting].items():
                what = f"{setting} {path} TP={tp} rank {rank}"
                loss, grad_hidden, grad_weight = map(torch.from_numpy, (loss, grad_hidden, grad_weight))
                assert relative_error(loss, ref_loss) < LOSS_RTOL, what
                assert relative_error(grad_hidden, ref_grad_hidden) < GRAD_RTOL, what
                assert relative_error(grad_weight, ref_grad_weight[shard]) < GRAD_RTOL, what
