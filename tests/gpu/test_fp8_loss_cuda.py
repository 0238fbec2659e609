"""FP8 in the fused loss on CUDA (``torch._scaled_mm`` through cuBLASLt / CUTLASS), checked by
``tools/validate_gpu.sh``; needs a GPU of compute capability >= 8.9, not Transformer Engine.

References: the float64 product of the dequantised operands (the GEMM), the same FP8 loss on
the CPU (validated there against a float64 emulation, tests/parallel/test_fp8_loss.py), and
the float32 fused loss on the GPU (the documented FP8 error bounds).
"""

from __future__ import annotations

import pytest
import torch

from megatron_dgrpo.parallel.fp8 import (
    E4M3,
    E5M2,
    Fp8LossConfig,
    current_amax,
    fp8_matmul_nt,
    quantize,
)
from megatron_dgrpo.testing.fp8_cases import (
    FP8_ERROR_BOUNDS,
    fp8_error,
    outside_bounds,
    realistic_case,
    relative,
    run_fused,
)

HAS_FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not HAS_FP8_GPU, reason="needs a CUDA GPU with FP8 (sm >= 8.9)")]
RECIPES = ("tensorwise", "rowwise")


@pytest.fixture(autouse=True)
def _exact_fp32():
    """No TF32: the float32 baselines below are meant to be float32."""
    torch.backends.cuda.matmul.allow_tf32 = False


# The operand pairs the fused loss multiplies: (hidden or logits' gradient, weight or hidden).
@pytest.mark.parametrize("formats", [(E4M3, E4M3), (E5M2, E4M3)])
@pytest.mark.parametrize("rowwise", [False, True])
def test_scaled_mm_on_cuda_is_the_float32_product_of_the_dequantised_values(formats, rowwise):
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(200, 512, generator=gen) * 2.0 ** torch.randint(-6, 6, (200, 1), generator=gen)
    b = torch.randn(384, 512, generator=gen) * 3.0
    a, b = a.cuda(), b.cuda()
    qa = quantize(a, formats[0], current_amax(a, rowwise))
    qb = quantize(b, formats[1], current_amax(b, rowwise))
    got = fp8_matmul_nt(qa, qb).double().cpu()
    da, db = qa.dequantize(torch.float64).cpu(), qb.dequantize(torch.float64).cpu()
    bound = 512 * 2.0 ** -24 * (da.abs() @ db.abs().T)
    worst = float(((got - da @ db.T).abs() / bound.clamp(min=1e-300)).max())
    print(f"{formats[0]} x {formats[1]} {'rowwise' if rowwise else 'tensorwise'}: "
          f"max |error| / (K 2^-24 sum |a b|) = {worst:.3f}")
    assert worst <= 1.0


def test_fused_fp8_loss_on_cuda_matches_the_cpu_and_the_documented_error():
    case = realistic_case(0)
    baseline = run_fused(case, None, chunk=128, device="cuda")
    for recipe in RECIPES:
        fp8 = Fp8LossConfig(recipe=recipe)
        gpu = run_fused(case, fp8, chunk=128, device="cuda")
        cpu = run_fused(case, fp8, chunk=128)
        against_cpu = (abs(float(gpu[0] - cpu[0])) / abs(float(cpu[0])), relative(gpu[1], cpu[1]),
                       relative(gpu[2], cpu[2]))
        errors = fp8_error(case, fp8, baseline, device="cuda")
        print(f"{recipe} on CUDA: vs the CPU FP8 loss, relative error loss {against_cpu[0]:.1e}, "
              f"grad hidden {against_cpu[1]:.1e}, grad weight {against_cpu[2]:.1e}; vs float32 "
              f"on CUDA: " + ", ".join(f"{name} {value:.4g}" for name, value in errors.items()))
        # float32 accumulation order differs; a few logits'-gradient elements may round to
        # the neighbouring FP8 value (each ~1e-5 of the gradient's norm).
        assert against_cpu[0] < 1e-5 and max(against_cpu[1:]) < 1e-3, against_cpu
        assert not outside_bounds(errors), (errors, FP8_ERROR_BOUNDS)
