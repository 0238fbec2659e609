"""FP8 output-layer GEMMs in the fused loss (megatron_dgrpo/parallel/fp8.py).

References, none of which shares code with the package:
* the quantiser: the nearest of all 256 FP8 bit patterns (ties to the even pattern), with
  the scale 2^floor(log2(fp8_max / amax)) computed in float64;
* the GEMM: the float64 product of the dequantised operands;
* the FP8 loss: a float64 emulation (reference quantiser + tests/parallel/plain_loss.py)
  of every quantisation step the recipe prescribes;
* the FP8 error: the float32 fused loss on the same inputs (measured; documented in
  megatron_dgrpo/testing/fp8_cases.py);
* TP=2: the TP=1 FP8 loss.
"""

import pytest
import torch
import torch.distributed as dist
from cases import portable
from plain_loss import plain_token_losses

from megatron_dgrpo.parallel.fp8 import (
    E4M3,
    E5M2,
    Fp8LossConfig,
    Fp8OutputLayer,
    current_amax,
    fp8_matmul_nt,
    quantize,
)
from megatron_dgrpo.parallel.launch import run_distributed
from megatron_dgrpo.testing.fp8_cases import (
    DGRPO_FULL_KL,
    FP8_ERROR_BOUNDS,
    case_batch,
    fp8_error,
    outside_bounds,
    realistic_case,
    relative,
    run_fused,
)

RECIPES = ("tensorwise", "rowwise")


# ----------------------------------------------------------------------------- references


def _fp8_grid(dtype):
    """(sorted finite values float64, their bit patterns) of an FP8 format."""
    codes = torch.arange(256, dtype=torch.uint8)
    values = codes.view(dtype).double()
    finite = torch.isfinite(values)
    values, codes = values[finite], codes[finite].long()
    order = torch.argsort(values, stable=True)
    return values[order], codes[order]


def reference_quantize(x: torch.Tensor, dtype, rowwise: bool) -> torch.Tensor:
    """``x`` (float64 ``[R, C]``) quantised to ``dtype`` and dequantised, in float64."""
    values, codes = _fp8_grid(dtype)
    fp8_max = float(values.max())
    amax = x.abs().amax(dim=1, keepdim=True) if rowwise else x.abs().max()
    scale = torch.where(amax > 0, 2.0 ** torch.floor(torch.log2(fp8_max / amax)),
                        torch.ones_like(amax))
    y = (x * scale).clamp(-fp8_max, fp8_max)
    hi = torch.searchsorted(values, y.contiguous()).clamp(1, len(values) - 1)
    lo = hi - 1
    down, up = y - values[lo], values[hi] - y
    pick_lo = (down < up) | ((down == up) & (codes[lo] % 2 == 0))
    return torch.where(pick_lo, values[lo], values[hi]) / scale


def _emulated_fp8_loss(case, fp8: Fp8LossConfig, chunk: int, vocab_size: int):
    """(loss, grad hidden, grad weight) of the fused FP8 loss, emulated in float64: every
    operand quantised as the recipe says (per chunk for the chunk's tensors), products of
    the dequantised values, the loss by plain_loss on the real vocabulary."""
    rowwise, grad_dtype = fp8.recipe == "rowwise", (E5M2 if fp8.format == "hybrid" else E4M3)
    h, w = case["hidden"].double(), case["weight"].double()
    th, tw = case["teacher_hidden"].double(), case["teacher_weight"].double()
    tokens, real = h.shape[0], slice(0, vocab_size)
    pieces = [slice(s, min(s + chunk, tokens)) for s in range(0, tokens, chunk)]

    def per_chunk(x):
        return torch.cat([reference_quantize(x[p], E4M3, rowwise) for p in pieces])

    w_q = reference_quantize(w[real], E4M3, rowwise)
    tw_q = reference_quantize(tw[real], E4M3, rowwise)
    logits = (per_chunk(h) @ w_q.T).requires_grad_()
    teacher_logits = per_chunk(th) @ tw_q.T
    loss = (plain_token_losses(DGRPO_FULL_KL, logits[None], teacher_logits[None],
                               case_batch(case, torch.float64))[0]
            * case["token_weights"].double()).sum()
    (grad_logits,) = torch.autograd.grad(loss, [logits])
    w_t = reference_quantize(w[real].T, E4M3, rowwise)  # [H, V]: per hidden column
    grad_hidden = torch.zeros_like(h)
    grad_weight = torch.zeros_like(w)
    for p in pieces:
        grad_hidden[p] = reference_quantize(grad_logits[p], grad_dtype, rowwise) @ w_t.T
        grad_t = reference_quantize(grad_logits[p].T, grad_dtype, rowwise)  # per vocab row
        grad_weight[real] += grad_t @ reference_quantize(h[p].T, E4M3, rowwise).T
    return loss.detach(), grad_hidden, grad_weight


def _worst_row(a, b):
    """max over rows of |a_row - b_row| / |b_row| (0 for rows that are 0 in both)."""
    a, b = a.double(), b.double()
    return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp(min=1e-300)).max())


# ------------------------------------------------------------------ quantiser and GEMM


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("rowwise", [False, True])
def test_quantize_is_the_nearest_fp8_value_with_power_of_two_scales(dtype, rowwise):
    gen = torch.Generator().manual_seed(0)
    # Rows spanning 2^-20..2^4 so that tensorwise scaling pushes small rows into FP8's
    # subnormals (and to 0) while rowwise does not.
    x = torch.randn(64, 96, generator=gen) * 2.0 ** torch.randint(-20, 5, (64, 1), generator=gen)
    q = quantize(x, dtype, current_amax(x, rowwise))
    assert q.data.dtype == dtype and q.data.shape == x.shape
    assert q.scale_inv.shape == ((64, 1) if rowwise else ())
    scale = q.scale_inv.reciprocal().double()
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)  # powers of two
    amax = x.abs().amax(dim=1, keepdim=True) if rowwise else x.abs().max()
    fp8_max = torch.finfo(dtype).max
    assert ((amax * scale <= fp8_max) & (amax * scale > fp8_max / 2)).all()
    expected = reference_quantize(x.double(), dtype, rowwise)
    assert torch.equal(q.dequantize(torch.float64), expected)


@pytest.mark.parametrize("formats, rowwise", [
    ((E4M3, E4M3), False), ((E5M2, E4M3), False), ((E4M3, E5M2), False),
    ((E4M3, E4M3), True), ((E5M2, E4M3), True)])
def test_fp8_gemm_is_the_float32_product_of_the_dequantised_values(formats, rowwise):
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(40, 256, generator=gen) * 2.0 ** torch.randint(-6, 6, (40, 1), generator=gen)
    b = torch.randn(48, 256, generator=gen) * 3.0
    qa = quantize(a, formats[0], current_amax(a, rowwise))
    qb = quantize(b, formats[1], current_amax(b, rowwise))
    got = fp8_matmul_nt(qa, qb)
    da, db = qa.dequantize(torch.float64), qb.dequantize(torch.float64)
    exact = da @ db.T
    # float32 accumulation of K exact products: |error| <= K * 2^-24 * sum |a_k b_k|.
    bound = 256 * 2.0 ** -24 * (da.abs() @ db.abs().T)
    assert got.dtype == torch.float32 and got.shape == (40, 48)
    assert ((got.double() - exact).abs() <= bound).all()
    # ... and it is the FP8 product, not the float32 one (FP8 rounding is ~1e-2 relative).
    assert relative(got, a.double() @ b.double().T) > 1e-3


def test_fp8_gemm_refuses_what_cublaslt_refuses():
    a = quantize(torch.randn(8, 32), E5M2, torch.tensor(3.0))
    with pytest.raises(ValueError, match="E5M2 x E5M2"):
        fp8_matmul_nt(a, quantize(torch.randn(16, 32), E5M2, torch.tensor(3.0)))
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8_matmul_nt(a, quantize(torch.randn(12, 32), E4M3, torch.tensor(3.0)))
    rows = torch.randn(16, 32)
    with pytest.raises(ValueError, match="both operands must be tensorwise or both rowwise"):
        fp8_matmul_nt(a, quantize(rows, E4M3, current_amax(rows, True)))
    e4m3_rows = quantize(rows[:8], E4M3, current_amax(rows[:8], True))
    with pytest.raises(ValueError, match="row-wise scaling needs the second operand in E4M3"):
        fp8_matmul_nt(e4m3_rows, quantize(rows, E5M2, current_amax(rows, True)))


def test_fp8_loss_refuses_bad_options_and_shapes():
    case = realistic_case(0, tokens=16, hidden=40, vocab=64)
    with pytest.raises(ValueError, match="hidden size and the per-rank vocabulary to be "
                                         "multiples of 16"):
        run_fused(case, Fp8LossConfig())
    with pytest.raises(ValueError, match="loss_fp8.recipe must be one of tensorwise, rowwise, "
                                         "got 'blockwise'"):
        Fp8LossConfig(recipe="blockwise").validate()
    with pytest.raises(ValueError, match="loss_fp8.format must be one of hybrid, e4m3"):
        Fp8LossConfig(format="e5m2").validate()


# ------------------------------------------------------------------------- the FP8 loss


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
def test_fp8_loss_equals_its_float64_emulation(recipe, fmt):
    """Every quantisation step as documented, including the chunk-wise scales, padding
    rows left out of every scale, and token counts that are not multiples of 16."""
    case = realistic_case(2, tokens=256, hidden=64, vocab=1024, padding=64)
    gen = torch.Generator().manual_seed(3)
    # Hidden rows over 2^-12..1 and token weights (so rows of the logits' gradient) over
    # 2^-24..1: the two recipes round these rows differently.
    case["hidden"] = case["hidden"] * 2.0 ** torch.randint(-12, 1, (256, 1), generator=gen)
    case["token_weights"] = 2.0 ** torch.randint(-24, 1, (256,), generator=gen) / 256
    fp8 = Fp8LossConfig(recipe=recipe, format=fmt)
    loss, grad_hidden, grad_weight, _ = run_fused(case, fp8, chunk=100, vocab_size=1024)
    ref_loss, ref_hidden, ref_weight = _emulated_fp8_loss(case, fp8, chunk=100, vocab_size=1024)
    assert abs(float(loss) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))
    # Measured: ~1e-7. The logits' gradient is quantised from float32 here and float64 in
    # the emulation, so an element at a rounding boundary may land one FP8 step apart.
    assert relative(grad_hidden, ref_hidden) < 1e-5
    assert relative(grad_weight, ref_weight) < 1e-5
    assert _worst_row(grad_hidden, ref_hidden) < 2e-3
    assert torch.equal(grad_weight[1024:], torch.zeros_like(grad_weight[1024:]))
    other = run_fused(case, Fp8LossConfig(recipe=RECIPES[recipe == "tensorwise"], format=fmt),
                   chunk=100, vocab_size=1024)
    assert _worst_row(other[1], grad_hidden) > 2e-2  # the recipes do differ on these rows


def test_fp8_loss_error_against_float32():
    """The documented FP8 error (megatron_dgrpo/testing/fp8_cases.py), both recipes."""
    case = realistic_case(0)
    baseline = run_fused(case, None, chunk=128)
    for recipe in RECIPES:
        for teacher in (True, False):
            errors = fp8_error(case, Fp8LossConfig(recipe=recipe, teacher=teacher), baseline)
            print(f"{recipe} teacher_fp8={teacher}: KL {baseline[3]['kl_teacher']:.3f} nats, "
                  + ", ".join(f"{name} {value:.4g}" for name, value in errors.items()))
            assert not outside_bounds(errors), (recipe, teacher, errors, FP8_ERROR_BOUNDS)


# --------------------------------------------------------------------------------- TP=2


def _weight_scales(weight, recipe, vocab_size, tp_group=None):
    """The weight's FP8 scales ([] or [V_local, 1]; and [] or [H, 1] transposed)."""
    layer = Fp8OutputLayer(weight, Fp8LossConfig(recipe=recipe), vocab_size, tp_group,
                           want_grads=True, chunk_tokens=96)
    return layer.weight.scale_inv, layer.weight_t.scale_inv


def _fp8_on_vocab_shards(rank, world_size, case, vocab_size):
    torch.set_num_threads(1)
    local = case["weight"].shape[0] // world_size
    rows = slice(rank * local, (rank + 1) * local)
    real_rows = max(0, min(local, vocab_size - rank * local))
    return portable({recipe: {
        "fused": run_fused(case, Fp8LossConfig(recipe=recipe), chunk=96, vocab_size=vocab_size,
                        tp_group=dist.group.WORLD, rows=rows)[:3],
        "scales": _weight_scales(case["weight"][rows], recipe, real_rows, dist.group.WORLD)}
        for recipe in RECIPES})


@pytest.mark.multiproc
def test_fp8_loss_at_tp2_equals_tp1():
    """Every amax over the vocabulary is all-reduced, so TP=2 quantises with TP=1's scales
    (checked directly for the weight) and the loss and gradients differ by float32
    summation order only (measured: <= 2.6e-7 relative). A logits'-gradient element that
    float32 rounding puts on the other side of an FP8 rounding boundary adds ~1e-5 (seen
    on other data), hence the bound of 1e-4."""
    case = realistic_case(4, tokens=296, hidden=128, vocab=4000, padding=96)
    # Rank 1's vocabulary rows 2^-14 the size of rank 0's: per-shard scales would round
    # them (and their logits' gradient) differently from TP=1 (measured: 2.7e-5 relative
    # in rank 1's weight gradient), all-reduced ones do not.
    for name in ("weight", "teacher_weight"):
        case[name][2048:] *= 2.0 ** -14
    per_rank = run_distributed(_fp8_on_vocab_shards, 2, args=(case, 4000))
    local = case["weight"].shape[0] // 2
    worst = {}
    for recipe in RECIPES:
        loss, grad_hidden, grad_weight, _ = run_fused(case, Fp8LossConfig(recipe=recipe), chunk=96,
                                                   vocab_size=4000)
        scales, scales_t = _weight_scales(case["weight"], recipe, 4000)
        for rank, results in enumerate(per_rank):
            rows = slice(rank * local, (rank + 1) * local)
            rank_scales, rank_scales_t = map(torch.from_numpy, results[recipe]["scales"])
            assert torch.equal(rank_scales, scales[rows] if scales.dim() else scales)
            assert torch.equal(rank_scales_t, scales_t)
            rank_loss, rank_hidden, rank_weight = map(torch.from_numpy, results[recipe]["fused"])
            what = f"{recipe} rank {rank}"
            errors = (abs(float(rank_loss - loss)) / abs(float(loss)),
                      relative(rank_hidden, grad_hidden),
                      relative(rank_weight, grad_weight[rows]))
            print(f"{what}: TP=2 vs TP=1 relative error loss {errors[0]:.1e}, grad hidden "
                  f"{errors[1]:.1e}, grad weight {errors[2]:.1e}")
            worst[what] = max(errors)
    assert max(worst.values()) < 1e-4, worst
