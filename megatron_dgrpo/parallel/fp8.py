"""FP8 GEMMs of the output layer inside the fused loss: quantisation, the scaled GEMM, and
the three products of the output layer (logits, hidden-state gradient, weight gradient).

Numbers: a tensor ``x`` is stored as ``data`` (``float8_e4m3fn`` or ``float8_e5m2``) and a
float32 ``scale_inv`` with ``x ~= data * scale_inv``. Scales are *current* (from this call's
amax) and powers of two: ``scale = 2^floor(log2(fp8_max / amax))``, so scaling is exact in
any float format and the only error is the FP8 rounding (round to nearest even; relative
error <= 2^-4 for E4M3 and 2^-3 for E5M2 in the normal range). Recipes:

* ``tensorwise``: one scale per GEMM operand (per-tensor current scaling);
* ``rowwise``: one scale per row of each operand along the GEMM's free dimension, i.e.
  per token for hidden states, per vocabulary row for the weight in the logits GEMM, per
  hidden column for the weight in the hidden-state-gradient GEMM, per token / per
  vocabulary row for the logits' gradient.

Formats: ``hybrid`` (Transformer Engine's HYBRID): hidden states and weights in E4M3, the
logits' gradient in E5M2 (range over precision); ``e4m3``: E4M3 everywhere. Every GEMM
accumulates and returns float32; the loss terms and their reductions stay float32.

Tensor parallelism: each amax taken over the vocabulary (the weight's, per tensor or per
hidden column; the logits' gradient's, per tensor or per token) is all-reduced (MAX) over
the TP group, so every rank quantises with the scales a TP=1 run would use and the TP=N
loss equals the TP=1 loss up to float32 summation order (tested). The cost is a scalar
(tensorwise) or a ``[chunk]`` vector (rowwise) MAX per chunk and one ``[H]`` vector per
call. Per-shard scales would differ from the global ones by powers of two, which round
values in FP8's normal range identically, so they would change only values near its
underflow; the all-reduce makes the TP invariance exact for a negligible cost. Rows past
the real vocabulary (Megatron's padding) are left out of every amax.

``torch._scaled_mm`` constraints (CUDA, compute capability >= 8.9; checked here on all
devices so CPU runs refuse what a GPU would): the first operand row-major, the second
column-major (both contiguous along the contraction dimension), contraction and output
column counts multiples of 16, scales float32 (``[]`` for tensorwise, ``[M, 1]`` and
``[1, N]`` for rowwise), no E5M2 x E5M2 product, and for the rowwise CUTLASS kernel the
second operand in E4M3 (the gradient is always the first operand here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from megatron_dgrpo.config import require_choice
from megatron_dgrpo.parallel.collectives import all_reduce

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
GEMM_MULTIPLE = 16  # torch._scaled_mm on CUDA: contraction and output columns
FP8_MIN_CAPABILITY = (8, 9)  # torch._scaled_mm on CUDA: Ada, Hopper and newer
QUANTIZE_BLOCK_ELEMENTS = 2 ** 24  # rows quantised at a time (bounds the temporary)
RECIPES = ("tensorwise", "rowwise")
FORMATS = ("hybrid", "e4m3")


@dataclass
class Fp8LossConfig:
    """FP8 output-layer GEMMs in the fused loss (``loss_fp8`` in the run config).

    ``recipe``: ``tensorwise`` (per-tensor current scaling) or ``rowwise`` (per token /
    per vocabulary row / per hidden column). ``format``: ``hybrid`` (E4M3 forward, E5M2
    logits gradient) or ``e4m3``. ``teacher``: the teacher's logits come from an FP8 GEMM
    too (False: in the teacher's own dtype).
    """

    recipe: Literal["tensorwise", "rowwise"] = "tensorwise"
    format: Literal["hybrid", "e4m3"] = "hybrid"
    teacher: bool = True

    def validate(self) -> None:
        require_choice("loss_fp8.recipe", self.recipe, RECIPES)
        require_choice("loss_fp8.format", self.format, FORMATS)

    @property
    def rowwise(self) -> bool:
        return self.recipe == "rowwise"

    @property
    def grad_dtype(self) -> torch.dtype:
        """FP8 format of the logits' gradient."""
        return E5M2 if self.format == "hybrid" else E4M3


def fp8_unsupported_reason(cuda_capability: tuple[int, int] | None) -> str | None:
    """Why ``torch._scaled_mm`` cannot run on a GPU of this compute capability (None: it
    can; ``None`` capability: the CPU, or not known)."""
    if cuda_capability is not None and tuple(cuda_capability) < FP8_MIN_CAPABILITY:
        return (f"FP8 GEMMs need a GPU of compute capability >= 8.9 (Ada, Hopper or newer); "
                f"this one has {cuda_capability[0]}.{cuda_capability[1]}")
    return None


def check_fp8_shapes(hidden_size: int, local_vocab: int, what: str) -> None:
    """ValueError unless ``torch._scaled_mm`` can take an output layer of ``[local_vocab,
    hidden_size]`` (both multiples of 16)."""
    if hidden_size % GEMM_MULTIPLE or local_vocab % GEMM_MULTIPLE:
        raise ValueError(
            f"loss_fp8: the {what} output layer is [{local_vocab}, {hidden_size}] per TP rank; "
            f"FP8 GEMMs need the hidden size and the per-rank vocabulary to be multiples of "
            f"{GEMM_MULTIPLE} (model.make_vocab_size_divisible_by pads the vocabulary)")


@dataclass(frozen=True)
class Fp8Tensor:
    """``data`` ``[R, C]`` float8, row-major; ``scale_inv`` float32 ``[]`` (tensorwise) or
    ``[R, 1]`` (rowwise). The value it stands for is ``data * scale_inv``."""

    data: Tensor
    scale_inv: Tensor

    @property
    def rowwise(self) -> bool:
        return self.scale_inv.dim() == 2

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.data.to(dtype) * self.scale_inv.to(dtype)


def current_amax(x: Tensor, rowwise: bool, group=None) -> Tensor:
    """float32 ``max |x|``: ``[R, 1]`` per row (rowwise) or ``[]``, MAX-all-reduced over
    ``group``; 0 for rows with no elements."""
    if x.shape[1] == 0 or (not rowwise and x.shape[0] == 0):
        amax = x.new_zeros((x.shape[0], 1) if rowwise else (), dtype=torch.float32)
    else:  # the inf-norm: no |x| temporary of x's size
        dims = {"dim": 1, "keepdim": True} if rowwise else {}
        amax = torch.linalg.vector_norm(x, float("inf"), **dims).float()
    return all_reduce(amax, "max", group)


def power_of_two_scale(amax: Tensor, dtype: torch.dtype) -> Tensor:
    """``2^floor(log2(fp8_max / amax))`` (float32, the shape of ``amax``); 1 where amax is 0."""
    ratio = torch.finfo(dtype).max / amax.clamp(min=torch.finfo(torch.float32).tiny)
    exponent = torch.floor(torch.log2(ratio)).clamp(max=126.0)
    return torch.where(amax > 0, torch.exp2(exponent), torch.ones_like(amax))


def quantize(x: Tensor, dtype: torch.dtype, amax: Tensor, out: Tensor | None = None) -> Fp8Tensor:
    """``x`` ``[R, C]`` (any strides) as FP8 with scales from ``amax`` (``[]`` or ``[R, 1]``),
    values past the format's range clamped to it.

    ``out``: an ``[R, C]`` FP8 tensor (or view) to write the values into; default a new
    one. ``x`` is processed ``QUANTIZE_BLOCK_ELEMENTS`` at a time, so the temporary stays
    small whatever its size (power-of-two scaling is exact in ``x``'s own dtype).
    """
    scale = power_of_two_scale(amax, dtype)
    data = torch.empty(x.shape, dtype=dtype, device=x.device) if out is None else out
    limit = torch.finfo(dtype).max
    step = max(1, QUANTIZE_BLOCK_ELEMENTS // max(1, x.shape[1]))
    for start in range(0, x.shape[0], step):
        rows = slice(start, start + step)
        block_scale = scale[rows] if scale.dim() else scale
        data[rows] = (x[rows] * block_scale.to(x.dtype)).clamp_(-limit, limit)
    return Fp8Tensor(data, scale.reciprocal())


def fp8_matmul_nt(a: Fp8Tensor, b: Fp8Tensor) -> Tensor:
    """``a @ b.T`` ``[M, N]`` in float32 from FP8 operands ``a`` ``[M, K]`` and ``b`` ``[N, K]``
    (both row-major, so ``b.data.t()`` is the column-major ``[K, N]`` that cuBLASLt wants).

    Both operands tensorwise or both rowwise; ``K`` and ``N`` multiples of 16; rowwise:
    ``b`` in E4M3 (PyTorch's CUTLASS row-wise kernel, used below cuBLAS 12.9).
    """
    if a.rowwise != b.rowwise:
        raise ValueError("fp8_matmul_nt: both operands must be tensorwise or both rowwise")
    if b.rowwise and b.data.dtype != E4M3:
        raise ValueError("fp8_matmul_nt: row-wise scaling needs the second operand in E4M3")
    (m, k), (n, k_b) = a.data.shape, b.data.shape
    if k != k_b or k % GEMM_MULTIPLE or n % GEMM_MULTIPLE:
        raise ValueError(f"fp8_matmul_nt: [{m}, {k}] x [{n}, {k_b}]^T needs equal contraction "
                         f"sizes and both K and N multiples of {GEMM_MULTIPLE}")
    if a.data.dtype == E5M2 and b.data.dtype == E5M2:
        raise ValueError("fp8_matmul_nt: an E5M2 x E5M2 product is not supported by cuBLASLt")
    scale_b = b.scale_inv.reshape(1, n) if b.rowwise else b.scale_inv
    return torch._scaled_mm(a.data, b.data.t(), scale_a=a.scale_inv, scale_b=scale_b,
                            out_dtype=torch.float32)


def _transposed_padded(x: Tensor, dtype: torch.dtype, amax: Tensor) -> Fp8Tensor:
    """``x.T`` ``[C, R]`` quantised, its rows zero-padded to a multiple of 16 columns (the
    contraction of the weight-gradient GEMM is over the chunk's tokens)."""
    rows, cols = x.shape
    padded = torch.zeros(cols, -(-rows // GEMM_MULTIPLE) * GEMM_MULTIPLE, dtype=dtype,
                         device=x.device)
    return Fp8Tensor(padded, quantize(x.T, dtype, amax, out=padded[:, :rows]).scale_inv)


class Fp8OutputLayer:
    """The output layer's three GEMMs with FP8 operands, for one call of the fused loss.

    ``weight`` ``[V_local, H]`` is quantised once here (E4M3, scales over its first
    ``real_rows`` rows, the rest being Megatron's padding): row-major for the logits and,
    when ``want_grads``, transposed ``[H, V_local]`` for the hidden-state gradient. Memory:
    ``2 * V_local * H`` bytes for the two copies, plus per chunk FP8 copies of the chunk's
    hidden states and logits' gradient; the weight gradient's float32 product is formed in
    blocks of vocabulary rows no larger than one chunk of logits (``chunk_tokens`` rows).
    """

    def __init__(self, weight: Tensor, config: Fp8LossConfig, real_rows: int, tp_group,
                 want_grads: bool, chunk_tokens: int):
        self.config = config
        self.tp_group = tp_group
        rows_per_block = chunk_tokens * weight.shape[0] // weight.shape[1]
        self.block_rows = max(GEMM_MULTIPLE, rows_per_block // GEMM_MULTIPLE * GEMM_MULTIPLE)
        rowwise = config.rowwise
        real = weight[:real_rows]
        self.weight = quantize(weight, E4M3, current_amax(weight, True) if rowwise
                               else current_amax(real, False, tp_group))
        self.weight_t = None
        if want_grads:
            if rowwise:  # per hidden column, over the real vocabulary of every rank
                self.weight_t = quantize(weight.T, E4M3, current_amax(real.T, True, tp_group))
            else:
                self.weight_t = Fp8Tensor(self.weight.data.T.contiguous(), self.weight.scale_inv)

    def logits(self, hidden: Tensor) -> Tensor:
        """``[n, V_local]`` float32 logits of ``hidden`` ``[n, H]``."""
        rowwise = self.config.rowwise
        return fp8_matmul_nt(quantize(hidden, E4M3, current_amax(hidden, rowwise)), self.weight)

    def backward(self, grad_logits: Tensor, hidden: Tensor, grad_hidden: Tensor,
                 grad_weight: Tensor) -> None:
        """Write ``grad_logits @ W`` into ``grad_hidden`` ``[n, H]`` and add
        ``grad_logits.T @ hidden`` to ``grad_weight`` ``[V_local, H]`` (float32), with
        ``grad_logits`` ``[n, V_local]`` float32 (padding columns 0)."""
        rowwise, grad_dtype = self.config.rowwise, self.config.grad_dtype
        token_amax = current_amax(grad_logits, rowwise, self.tp_group)
        grad_hidden.copy_(fp8_matmul_nt(quantize(grad_logits, grad_dtype, token_amax),
                                        self.weight_t))
        grad_t = _transposed_padded(grad_logits, grad_dtype,
                                    current_amax(grad_logits.T, True) if rowwise else token_amax)
        hidden_t = _transposed_padded(hidden, E4M3, current_amax(hidden.T, rowwise))
        for start in range(0, grad_weight.shape[0], self.block_rows):
            rows = slice(start, start + self.block_rows)
            block = Fp8Tensor(grad_t.data[rows], grad_t.scale_inv[rows] if rowwise
                              else grad_t.scale_inv)
            grad_weight[rows] += fp8_matmul_nt(block, hidden_t)
