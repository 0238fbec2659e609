"""Malformed inputs to both loss entry points fail with a ValueError naming the culprit."""

import pytest
import torch
from cases import case_batch, make_case

from megatron_dgrpo.algorithms import LossConfig, token_weights
from megatron_dgrpo.parallel.fused import loss_from_hidden
from megatron_dgrpo.parallel.materialized import loss_from_logits

CASE = make_case(seed=1, batch_size=2, seq_len=4, vocab=8, hidden=3)
WEIGHTS = token_weights(CASE["loss_mask"], "token_mean", dtype=torch.float64)


def batch(teacher=None, **overrides):
    built = case_batch(CASE, teacher, WEIGHTS)
    for name, value in overrides.items():
        setattr(built, name, value)
    return built


def logits_of(prefix):
    return CASE[f"{prefix}_hidden"] @ CASE[f"{prefix}_weight"].T


def with_value_at_loss_token(name, value):
    tensor = CASE[name].clone()
    tensor[CASE["loss_mask"]] = tensor[CASE["loss_mask"]].index_fill(0, torch.tensor([0]), value)
    return tensor


@pytest.mark.parametrize("call, message", [
    (lambda: loss_from_logits(LossConfig(objective="sft"), batch(), logits_of("student")[:, :3]),
     r"student_logits must have shape \[\*S, X\] with S=\(2, 4\)"),
    (lambda: loss_from_logits(LossConfig(), batch(), logits_of("student"), logits_of("teacher")[..., :6]),
     "teacher_logits vocabulary \\(6 per shard\\) differs from student_logits \\(8\\)"),
    (lambda: loss_from_logits(LossConfig(), batch(), logits_of("student"),
                              logits_of("teacher").index_fill(2, torch.tensor([1]), float("nan"))),
     "teacher logits contain non-finite"),
    (lambda: loss_from_logits(LossConfig(objective="sft"), batch(),
                              logits_of("student").index_fill(2, torch.tensor([1]), float("inf"))),
     "student logits contain non-finite"),
    (lambda: loss_from_logits(LossConfig(objective="grpo"),
                              batch(old_logp=with_value_at_loss_token("old_logp", float("nan"))),
                              logits_of("student")),
     "old_logp contains non-finite"),
    (lambda: loss_from_logits(LossConfig(objective="grpo"), batch(advantages=CASE["advantages"][:, :2]),
                              logits_of("student")),
     r"advantages must have shape S=\(2, 4\)"),
    (lambda: loss_from_logits(LossConfig(objective="sft"), batch(targets=with_value_at_loss_token("targets", 8)),
                              logits_of("student")),
     r"targets has ids outside \[0, 8\)"),
    (lambda: loss_from_logits(LossConfig(objective="kd", kl_estimator="topk"), batch("topk", teacher_topk_logp=None),
                              logits_of("student")),
     "teacher_topk_indices and teacher_topk_logp must be given together"),
    (lambda: loss_from_logits(LossConfig(objective="dpo"), batch(), logits_of("student")),
     "unknown objective 'dpo'"),
    (lambda: loss_from_hidden(LossConfig(), batch(), CASE["student_hidden"], CASE["student_weight"],
                              CASE["teacher_hidden"], CASE["teacher_weight"][:5]),
     "teacher_weight vocabulary \\(5 per shard\\) differs from student_weight \\(8\\)"),
    (lambda: loss_from_hidden(LossConfig(), batch(), CASE["student_hidden"], CASE["student_weight"][:, :2]),
     r"student_weight must be \[V_local, H=3\]"),
    (lambda: loss_from_hidden(LossConfig(), batch(), CASE["student_hidden"], CASE["student_weight"],
                              CASE["teacher_hidden"]),
     "teacher_hidden and teacher_weight must be given together"),
    (lambda: loss_from_hidden(LossConfig(objective="sft"), batch(),
                              CASE["student_hidden"].index_fill(2, torch.tensor([0]), float("nan")),
                              CASE["student_weight"]),
     "student logits contain non-finite"),
    (lambda: loss_from_hidden(LossConfig(objective="sft"), batch(), CASE["student_hidden"],
                              CASE["student_weight"], chunk_tokens=0),
     "chunk_tokens must be >= 1"),
])
def test_bad_input_fails_with_a_message_naming_it(call, message):
    with pytest.raises(ValueError, match=message):
        call()
