"""Random float64 test cases and the objective settings the parallel tests sweep.

A case is a dict of full-batch tensors (hidden states, output weights, per-token signals).
Signals are drawn so that clipping, dual clipping and the importance cap all trigger.
"""

from __future__ import annotations

import torch
from plain_loss import plain_loss

from megatron_dgrpo.algorithms import (
    LossConfig,
    TokenBatch,
    broadcast_to_tokens,
    group_advantages,
)

# name -> (config, where the teacher signal comes from)
#   "logits": teacher hidden states + output weight (full distribution)
#   "topk":   the teacher's top-k ids and log-probs only
#   "cached": the teacher's log-probs of the sampled tokens only
SETTINGS = {
    "sft": (LossConfig(objective="sft"), None),
    "kd_full": (LossConfig(objective="kd"), "logits"),
    "kd_topk": (LossConfig(objective="kd", kl_estimator="topk"), "topk"),
    "kd_topk_renorm_seq": (LossConfig(objective="kd", kl_estimator="topk", topk_tail="renormalize",
                                      aggregation="seq_mean"), "topk"),
    "grpo_k2": (LossConfig(objective="grpo"), None),
    "grpo_k3_dual_seq": (LossConfig(objective="grpo", kl_estimator="k3", dual_clip=2.0,
                                    aggregation="seq_mean"), None),
    "grpo_k2_no_tis": (LossConfig(objective="grpo", kl_estimator="k2", tis_cap=None, eps_high=0.2), None),
    "opd_full": (LossConfig(objective="opd"), "logits"),
    "opd_k3_cached": (LossConfig(objective="opd", kl_estimator="k3"), "cached"),
    "opd_topk": (LossConfig(objective="opd", kl_estimator="topk"), "topk"),
    "opd_advantage": (LossConfig(objective="opd", form="advantage"), "logits"),
    "dgrpo_full": (LossConfig(), "logits"),
    "dgrpo_k3_ref_dual": (LossConfig(kl_estimator="k3", ref_kl_coef=0.02, dual_clip=2.5), "logits"),
    "dgrpo_topk_seq": (LossConfig(kl_estimator="topk", aggregation="seq_mean"), "topk"),
    "dgrpo_advantage": (LossConfig(form="advantage", kl_coef=0.3), "cached"),
}


def make_case(seed: int, batch_size: int = 4, seq_len: int = 8, vocab: int = 16, hidden: int = 6,
              topk: int = 4, group_size: int = 2, mask_density: float = 0.7,
              empty_row: bool = True) -> dict:
    """Full-batch float64 tensors for one random case (``empty_row``: row 0 has no loss tokens)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    mask = torch.rand(batch_size, seq_len, generator=gen) < mask_density
    if empty_row:
        mask[0] = False
    targets = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
    targets = torch.where(mask, targets, -100)
    case = {
        "loss_mask": mask, "targets": targets,
        "student_hidden": randn(batch_size, seq_len, hidden),
        "student_weight": randn(vocab, hidden, scale=0.8),
        "teacher_hidden": randn(batch_size, seq_len, hidden),
        "teacher_weight": randn(vocab, hidden, scale=0.8),
    }
    student_logp = torch.log_softmax(case["student_hidden"] @ case["student_weight"].T, -1)
    teacher_logp = torch.log_softmax(case["teacher_hidden"] @ case["teacher_weight"].T, -1)
    safe_targets = torch.where(mask, targets, 0)[..., None]
    sampled = student_logp.gather(-1, safe_targets)[..., 0]
    case["old_logp"] = sampled + randn(batch_size, seq_len, scale=0.5)
    case["rollout_logp"] = case["old_logp"] + randn(batch_size, seq_len, scale=0.5)
    case["ref_logp"] = sampled + randn(batch_size, seq_len, scale=0.5)
    case["teacher_logp"] = teacher_logp.gather(-1, safe_targets)[..., 0]
    case["teacher_topk_logp"], case["teacher_topk_indices"] = teacher_logp.topk(topk, dim=-1)
    rewards = randn(batch_size)
    case["advantages"] = broadcast_to_tokens(group_advantages(rewards, group_size), mask)
    return case


def case_batch(case: dict, teacher: str | None, weights: torch.Tensor, rows=slice(None),
               cols=slice(None)) -> TokenBatch:
    """The TokenBatch of ``case[rows, cols]`` with the given weights and teacher signal."""
    def part(name):
        return case[name][rows, cols]

    return TokenBatch(
        loss_mask=part("loss_mask"), weights=weights, targets=part("targets"),
        advantages=part("advantages"), old_logp=part("old_logp"),
        rollout_logp=part("rollout_logp"), ref_logp=part("ref_logp"),
        teacher_logp=part("teacher_logp") if teacher == "cached" else None,
        teacher_topk_indices=part("teacher_topk_indices") if teacher == "topk" else None,
        teacher_topk_logp=part("teacher_topk_logp") if teacher == "topk" else None,
    )


def teacher_inputs(case: dict, teacher: str | None, rows=slice(None), cols=slice(None)):
    """(teacher_hidden, teacher_weight) when the setting uses teacher logits, else Nones."""
    if teacher != "logits":
        return None, None
    return case["teacher_hidden"][rows, cols], case["teacher_weight"]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max(max |e|, 1e-12): one number for scalars and tensors alike."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = max(float(expected.abs().max()), 1e-12)
    return float((actual - expected).abs().max()) / scale


def plain_reference(case: dict, config: LossConfig, teacher: str | None, temperature: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d loss / d student_hidden, d loss / d student_weight) of the plain float64
    re-implementation on the full batch, both models' logits divided by ``temperature``."""
    hidden = case["student_hidden"].clone().requires_grad_()
    weight = case["student_weight"].clone().requires_grad_()
    teacher_logits = None
    if teacher == "logits":
        teacher_logits = case["teacher_hidden"] @ case["teacher_weight"].T / temperature
    batch = case_batch(case, teacher, weights=torch.zeros(case["loss_mask"].shape, dtype=torch.float64))
    loss = plain_loss(config, hidden @ weight.T / temperature, teacher_logits, batch)
    grad_hidden, grad_weight = torch.autograd.grad(loss, [hidden, weight], allow_unused=True)
    grad_hidden = torch.zeros_like(hidden) if grad_hidden is None else grad_hidden
    grad_weight = torch.zeros_like(weight) if grad_weight is None else grad_weight
    return loss.detach(), grad_hidden, grad_weight


MODEL_KEYS = ("student_weight", "teacher_weight")


def map_tokens(case: dict, fn) -> dict:
    """The case with ``fn`` applied to every per-token tensor ([B, T, ...]); the output
    weights are kept whole."""
    return {key: value if key in MODEL_KEYS else fn(value) for key, value in case.items()}


def portable(tree):
    """Tensors -> numpy arrays, recursively: what a gloo worker can return through
    run_distributed's queue (torch's queue shares tensor storage with the exiting worker)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().numpy().copy()
    if isinstance(tree, dict):
        return {key: portable(value) for key, value in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(portable(value) for value in tree)
    return tree
