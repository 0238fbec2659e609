"""evaluate(): per-token objectives turned into a weighted loss and metrics, checked against
plain per-token arithmetic; missing inputs are named; masked tokens cannot leak NaN."""

import math

import pytest
import torch

from megatron_dgrpo.algorithms import (
    LossConfig,
    LossMetrics,
    StudentTerms,
    TokenBatch,
    evaluate,
)

MASK = torch.tensor([True, True, True, False, True, True])
WEIGHTS = torch.where(MASK, torch.tensor(1 / 5, dtype=torch.float64), 0.0)


def tensor(values):
    return torch.tensor(values, dtype=torch.float64)


def student_terms():
    return StudentTerms(logp=tensor([-1.0, -2.0, -0.5, -3.0, -1.5, -0.2]).requires_grad_(),
                        entropy=tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
                        teacher_logp=tensor([-1.2, -1.0, -0.4, -9.0, -2.5, -0.1]))


def signals(**overrides):
    fields = {"loss_mask": MASK, "weights": WEIGHTS, "targets": torch.zeros(6, dtype=torch.int64),
              "advantages": tensor([1.0, -1.0, 0.5, 7.0, -2.0, 1.0]),
              "old_logp": tensor([-1.5, -1.5, -0.5, 0.0, -0.2, -0.2]),
              "rollout_logp": tensor([-1.0, -1.5, -2.0, 0.0, -0.2, -0.1]),
              "ref_logp": tensor([-1.1, -2.2, -0.3, 0.0, -1.0, -0.3])}
    fields.update(overrides)
    return TokenBatch(**fields)


def test_dgrpo_k3_loss_and_every_metric_match_plain_arithmetic():
    config = LossConfig(kl_estimator="k3", ref_kl_coef=0.5, ref_kl_estimator="k3", kl_coef=0.1,
                        dual_clip=3.0)
    terms, batch = student_terms(), signals()
    loss, metrics = evaluate(config, terms, batch)
    tokens = [i for i in range(6) if MASK[i]]
    logp, teacher, old = terms.logp.tolist(), terms.teacher_logp.tolist(), batch.old_logp.tolist()
    adv, rollout, ref = batch.advantages.tolist(), batch.rollout_logp.tolist(), batch.ref_logp.tolist()

    def k3(p, q):
        return math.exp(q - p) - (q - p) - 1

    expected_loss, stats = 0.0, {k: [] for k in ("low", "high", "dual", "ratio", "is", "capped", "klt", "klr")}
    for i in tokens:
        r = math.exp(logp[i] - old[i])
        surrogate = min(r * adv[i], min(max(r, 0.8), 1.28) * adv[i])
        if adv[i] < 0:
            surrogate = max(surrogate, 3.0 * adv[i])
        is_ratio = math.exp(old[i] - rollout[i])
        token = -surrogate * min(is_ratio, 2.0) + 0.1 * k3(logp[i], teacher[i]) + 0.5 * k3(logp[i], ref[i])
        expected_loss += token / 5
        stats["low"].append(adv[i] < 0 and r < 0.8)
        stats["high"].append(adv[i] > 0 and r > 1.28)
        stats["dual"].append(adv[i] < 0 and r > 3.0)
        stats["ratio"].append(r)
        stats["is"].append(is_ratio)
        stats["capped"].append(is_ratio > 2.0)
        stats["klt"].append(k3(logp[i], teacher[i]))
        stats["klr"].append(k3(logp[i], ref[i]))

    def mean(values):
        return sum(float(v) for v in values) / len(values)

    assert float(loss.detach()) == pytest.approx(expected_loss, rel=1e-12)
    flat = metrics.as_dict()
    assert any(stats["low"]) and any(stats["high"]) and any(stats["capped"])  # the case exercises them
    expected = {
        "clip_frac_low": mean(stats["low"]), "clip_frac_high": mean(stats["high"]),
        "clip_frac_dual": mean(stats["dual"]), "ratio_mean": mean(stats["ratio"]),
        "ratio_min": min(stats["ratio"]), "ratio_max": max(stats["ratio"]),
        "is_ratio_mean": mean(stats["is"]), "is_ratio_min": min(stats["is"]),
        "is_ratio_max": max(stats["is"]), "is_capped_frac": mean(stats["capped"]),
        "adv_mean": mean([adv[i] for i in tokens]), "adv_min": -2.0, "adv_max": 1.0,
        "kl_teacher": mean(stats["klt"]), "kl_ref": mean(stats["klr"]),
        "entropy": mean([terms.entropy[i] for i in tokens]),
        "rollout_logp_gap_min": min(abs(old[i] - rollout[i]) for i in tokens),
        "rollout_logp_gap_max": max(abs(old[i] - rollout[i]) for i in tokens),
    }
    assert flat == pytest.approx(expected, rel=1e-12)


def test_without_old_logp_the_policy_term_is_on_policy_and_the_gap_uses_the_student():
    """One optimizer step per rollout batch: old_logp omitted = the detached student
    log-probs, so every ratio is 1 and the gradient is -IS_t * A_t * w_t per token."""
    config = LossConfig(objective="grpo", kl_coef=0.0)
    terms, batch = student_terms(), signals(old_logp=None)
    loss, metrics = evaluate(config, terms, batch)
    loss.backward()
    logp, rollout, adv = terms.logp.tolist(), batch.rollout_logp.tolist(), batch.advantages.tolist()
    expected_grad = [-min(math.exp(logp[i] - rollout[i]), 2.0) * adv[i] / 5 if MASK[i] else 0.0
                     for i in range(6)]
    assert terms.logp.grad.tolist() == pytest.approx(expected_grad, rel=1e-12)
    flat = metrics.as_dict()
    assert flat["ratio_min"] == flat["ratio_max"] == 1.0
    assert flat["rollout_logp_gap_max"] == pytest.approx(
        max(abs(logp[i] - rollout[i]) for i in range(6) if MASK[i]), rel=1e-12)


def test_metrics_merge_adds_means_and_takes_extremes():
    left = LossMetrics({"a": tensor(0.25)}, {"r": tensor(0.5)}, {"r": tensor(2.0)})
    right = LossMetrics({"a": tensor(0.5), "b": tensor(1.0)}, {"r": tensor(0.1)}, {"r": tensor(1.0)})
    assert left.merge(right).as_dict() == {"a": 0.75, "b": 1.0, "r_min": 0.1, "r_max": 2.0}
    empty = LossMetrics.from_tokens(torch.zeros(0, dtype=torch.bool), torch.zeros(0), {}, {"r": torch.zeros(0)})
    assert empty.as_dict() == {"r_min": math.inf, "r_max": -math.inf}


@pytest.mark.parametrize("config, batch, missing", [
    (LossConfig(objective="grpo"), signals(advantages=None), "batch.advantages"),
    (LossConfig(objective="grpo"), signals(ref_logp=None), "batch.ref_logp"),
    (LossConfig(objective="opd"), signals(), "teacher logits"),
    (LossConfig(objective="kd", kl_estimator="topk"), signals(), "batch.teacher_topk_indices"),
    (LossConfig(form="advantage"), signals(), "teacher logits or batch.teacher_logp"),
])
def test_missing_inputs_are_named(config, batch, missing):
    terms = student_terms()
    terms.teacher_logp = None
    with pytest.raises(ValueError, match=missing):
        evaluate(config, terms, batch)


def test_extreme_values_on_masked_tokens_do_not_leak_into_loss_or_gradient():
    terms = student_terms()
    batch = signals(old_logp=torch.where(MASK, signals().old_logp, 500.0),
                    ref_logp=torch.where(MASK, signals().ref_logp, -1e4),
                    advantages=torch.where(MASK, signals().advantages, math.inf))
    loss, _ = evaluate(LossConfig(objective="grpo"), terms, batch)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and torch.isfinite(terms.logp.grad).all()
    assert float(terms.logp.grad[3]) == 0.0
