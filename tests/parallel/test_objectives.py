"""Every objective, from logits and from hidden states (fused), against the plain float64
re-implementation in plain_loss.py, on one process (TP=1)."""

import pytest
import torch
from cases import (
    SETTINGS,
    case_batch,
    make_case,
    plain_reference,
    relative_error,
    teacher_inputs,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_dgrpo.algorithms import LossConfig, token_weights
from megatron_dgrpo.parallel.fused import loss_from_hidden
from megatron_dgrpo.parallel.materialized import loss_from_logits

LOSS_RTOL, GRAD_RTOL = 1e-6, 1e-5


def run_materialized(case, config, teacher, temperature=1.0):
    hidden = case["student_hidden"].clone().requires_grad_()
    weight = case["student_weight"].clone().requires_grad_()
    teacher_hidden, teacher_weight = teacher_inputs(case, teacher)
    teacher_logits = None if teacher_hidden is None else teacher_hidden @ teacher_weight.T
    weights = token_weights(case["loss_mask"], config.aggregation, dtype=torch.float64)
    loss, metrics = loss_from_logits(config, case_batch(case, teacher, weights), hidden @ weight.T,
                                     teacher_logits, temperature=temperature)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad, metrics


def run_fused(case, config, teacher, chunk_tokens, temperature=1.0):
    hidden = case["student_hidden"].clone().requires_grad_()
    weight = case["student_weight"].clone().requires_grad_()
    teacher_hidden, teacher_weight = teacher_inputs(case, teacher)
    weights = token_weights(case["loss_mask"], config.aggregation, dtype=torch.float64)
    loss, metrics = loss_from_hidden(config, case_batch(case, teacher, weights), hidden, weight,
                                     teacher_hidden, teacher_weight, chunk_tokens=chunk_tokens,
                                     temperature=temperature)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad, metrics


def assert_matches(actual, expected, what):
    loss, grad_hidden, grad_weight = actual[:3]
    ref_loss, ref_grad_hidden, ref_grad_weight = expected
    assert float(ref_grad_weight.abs().max()) > 0, f"{what}: degenerate case, zero reference gradient"
    assert relative_error(loss, ref_loss) < LOSS_RTOL, f"{what}: loss {loss} vs {ref_loss}"
    assert relative_error(grad_hidden, ref_grad_hidden) < GRAD_RTOL, f"{what}: grad hidden"
    assert relative_error(grad_weight, ref_grad_weight) < GRAD_RTOL, f"{what}: grad weight"


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_materialized_and_fused_match_the_plain_reference(setting):
    case = make_case(seed=11, batch_size=4, seq_len=9, vocab=23)
    config, teacher = SETTINGS[setting]
    expected = plain_reference(case, config, teacher)
    materialized = run_materialized(case, config, teacher)
    assert_matches(materialized, expected, f"{setting} materialized")
    for chunk_tokens in (1, 7, None):
        fused = run_fused(case, config, teacher, chunk_tokens)
        assert_matches(fused, expected, f"{setting} fused chunk={chunk_tokens}")
        assert fused[3].as_dict() == pytest.approx(materialized[3].as_dict(), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_fused_row_blocks_and_a_full_loss_mask_match_the_plain_reference(setting, monkeypatch):
    """The fused loss takes each chunk's terms over blocks of rows (probabilities recomputed
    per block in the backward): blocks of 2 rows (of 7-token chunks: 2, 2, 2, 1) must give
    the reference's loss and gradients; so must a batch whose every token is a loss token
    (hidden states then used in place, not selected)."""
    monkeypatch.setattr("megatron_dgrpo.parallel.fused.ROW_BLOCK_ELEMENTS", 2 * 23)
    config, teacher = SETTINGS[setting]
    for case in (make_case(seed=11, batch_size=4, seq_len=9, vocab=23),
                 make_case(seed=12, batch_size=4, seq_len=9, vocab=23, mask_density=1.1,
                           empty_row=False)):
        expected = plain_reference(case, config, teacher)
        assert_matches(run_fused(case, config, teacher, 7), expected, f"{setting} row blocks")


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_the_temperature_divides_both_models_logits(setting):
    """The trained policy is softmax(logits / T): loss and gradients equal the plain
    reference on logits / T (student and teacher), fused and materialized."""
    case = make_case(seed=12, batch_size=4, seq_len=9, vocab=23)
    config, teacher = SETTINGS[setting]
    expected = plain_reference(case, config, teacher, temperature=0.6)
    assert_matches(run_materialized(case, config, teacher, temperature=0.6), expected,
                   f"{setting} materialized T=0.6")
    assert_matches(run_fused(case, config, teacher, 5, temperature=0.6), expected,
                   f"{setting} fused T=0.6")
    untempered = plain_reference(case, config, teacher)
    assert relative_error(expected[0], untempered[0]) > 1e-3  # the temperature matters here


@settings(max_examples=30, deadline=None)
@given(setting=st.sampled_from(sorted(SETTINGS)), seed=st.integers(0, 2 ** 16),
       batch_groups=st.integers(1, 3), group_size=st.integers(1, 3), seq_len=st.integers(1, 7),
       vocab=st.integers(5, 19), density=st.floats(0.0, 1.0), empty_row=st.booleans(),
       eps_low=st.floats(0.0, 0.5), eps_high=st.floats(0.0, 1.0),
       dual_clip=st.one_of(st.none(), st.floats(1.1, 4.0)), chunk_tokens=st.integers(1, 9))
def test_property_random_shapes_masks_groups_and_clips(setting, seed, batch_groups, group_size,
                                                       seq_len, vocab, density, empty_row, eps_low,
                                                       eps_high, dual_clip, chunk_tokens):
    base, teacher = SETTINGS[setting]
    config = LossConfig(**{**base.__dict__, "eps_low": eps_low, "eps_high": eps_high,
                           "dual_clip": dual_clip})
    case = make_case(seed, batch_size=batch_groups * group_size, seq_len=seq_len, vocab=vocab,
                     topk=min(4, vocab - 1), group_size=group_size, mask_density=density,
                     empty_row=empty_row)
    ref_loss, ref_grad_hidden, ref_grad_weight = plain_reference(case, config, teacher)
    for loss, grad_hidden, grad_weight, _ in (run_materialized(case, config, teacher),
                                              run_fused(case, config, teacher, chunk_tokens)):
        assert torch.isfinite(loss) and torch.isfinite(grad_hidden).all()
        assert abs(float(loss - ref_loss)) <= LOSS_RTOL * max(abs(float(ref_loss)), 1e-9)
        assert float((grad_hidden - ref_grad_hidden).abs().max()) <= \
            GRAD_RTOL * max(float(ref_grad_hidden.abs().max()), 1e-9)
        assert float((grad_weight - ref_grad_weight).abs().max()) <= \
            GRAD_RTOL * max(float(ref_grad_weight.abs().max()), 1e-9)
        if not case["loss_mask"].any():
            assert float(loss) == 0.0 and not grad_weight.any()


def test_fused_backward_scales_by_the_incoming_gradient():
    case = make_case(seed=2)
    config, teacher = SETTINGS["dgrpo_full"]
    _, ref_grad_hidden, ref_grad_weight = plain_reference(case, config, teacher)
    hidden = case["student_hidden"].clone().requires_grad_()
    weight = case["student_weight"].clone().requires_grad_()
    weights = token_weights(case["loss_mask"], config.aggregation, dtype=torch.float64)
    loss, _ = loss_from_hidden(config, case_batch(case, teacher, weights), hidden, weight,
                               *teacher_inputs(case, teacher), chunk_tokens=3)
    (-2.5 * loss).backward()
    assert relative_error(hidden.grad, -2.5 * ref_grad_hidden) < GRAD_RTOL
    assert relative_error(weight.grad, -2.5 * ref_grad_weight) < GRAD_RTOL


def _bf16_exact_case(seed: int) -> dict:
    """A case whose bf16 logits are exact: hidden states in {-1, 0, 1}, weights multiples of
    1/8 in [-2, 2], H = 6, so every logit is a multiple of 1/8 below 13 in magnitude (7
    significant bits). Any loss error is then the reduction's, not the matmul's."""
    case = make_case(seed=seed, batch_size=4, seq_len=9, vocab=300, hidden=6)
    gen = torch.Generator().manual_seed(seed)
    for name in ("student_hidden", "teacher_hidden"):
        case[name] = torch.randint(-1, 2, case[name].shape, generator=gen).double()
    for name in ("student_weight", "teacher_weight"):
        case[name] = torch.randint(-16, 17, case[name].shape, generator=gen).double() / 8
    return case


@pytest.mark.parametrize("setting", ["dgrpo_full", "kd_full", "grpo_k2"])
def test_bf16_models_reduce_their_logits_in_float32(setting):
    """bf16 hidden states and weights give the float64 reference's loss and metrics to float32
    precision (a bf16 log-sum-exp over 300 logits would be off by ~1e-3 relative)."""
    case = _bf16_exact_case(seed=5)
    config, teacher = SETTINGS[setting]
    expected_loss = plain_reference(case, config, teacher)[0]
    weights = token_weights(case["loss_mask"], config.aggregation, dtype=torch.float64)
    batch = case_batch(case, teacher, weights)
    bf16 = {name: case[name].to(torch.bfloat16) for name in
            ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")}
    assert torch.equal((bf16["student_hidden"] @ bf16["student_weight"].T).double(),
                       case["student_hidden"] @ case["student_weight"].T)  # exact logits
    hidden = bf16["student_hidden"].clone().requires_grad_()
    weight = bf16["student_weight"].clone().requires_grad_()
    teacher_hidden, teacher_weight = ((bf16["teacher_hidden"], bf16["teacher_weight"])
                                      if teacher == "logits" else (None, None))
    fused, _ = loss_from_hidden(config, batch, hidden, weight, teacher_hidden, teacher_weight,
                                chunk_tokens=7)
    fused.backward()
    assert weight.grad.dtype == torch.bfloat16 and hidden.grad.dtype == torch.bfloat16
    teacher_logits = None if teacher_hidden is None else teacher_hidden @ teacher_weight.T
    materialized, _ = loss_from_logits(config, batch, bf16["student_hidden"] @ bf16["student_weight"].T,
                                       teacher_logits)
    for loss in (fused, materialized):
        assert relative_error(loss.detach(), expected_loss) < 1e-5, (loss, expected_loss)
