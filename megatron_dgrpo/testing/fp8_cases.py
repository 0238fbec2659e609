"""Output-layer inputs at realistic logit scales, and the fused loss run on them, for the FP8
loss tests on CPU (``tests/parallel/test_fp8_loss.py``) and on CUDA (``tests/gpu``).

``FP8_ERROR_BOUNDS`` is the documented error of the FP8 fused loss against the float32 one
on :func:`realistic_case` (seed 0, defaults), measured on CPU with torch 2.13.0+cpu:

* H=256, V=4096, 512 tokens sampled from the student, student logits of std 3 (entropy
  ~4.4 nats), dGRPO with the full-vocabulary KL to a correlated teacher (KL 2.3-3.6 nats),
  hybrid format;
* seeds 0-2 (0 is the tests' and the worst): |KL error| 0.023-0.047 nats with the teacher's
  logits in FP8 too, 0.006-0.014 nats with them in float32; |loss error| 3.6e-3-6.9e-3;
  gradient cosine 0.9918-0.9936 (relative error 12-13%, mostly the forward's logit error,
  ~0.15 nats per logit, moving the probabilities);
* both recipes give identical numbers here: with power-of-two scales a row's rounding does
  not depend on its scale unless values leave FP8's normal range.

The bounds are ~1.5x the measured worst case.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_dgrpo.algorithms import (
    LossConfig,
    TokenBatch,
    broadcast_to_tokens,
    group_advantages,
    token_weights,
)
from megatron_dgrpo.parallel.fp8 import Fp8LossConfig
from megatron_dgrpo.parallel.fused import loss_from_hidden

DGRPO_FULL_KL = LossConfig(objective="dgrpo", kl_estimator="full", kl_coef=0.04)
FP8_ERROR_BOUNDS = {
    "kl_error_nats": 0.07,  # |kl_teacher(fp8) - kl_teacher(fp32)|, teacher logits in FP8
    "kl_error_nats_teacher_fp32": 0.025,  # the same with Fp8LossConfig(teacher=False)
    "loss_error": 0.011,  # |loss(fp8) - loss(fp32)|
    "grad_cosine": 0.985,  # min cosine(grad fp8, grad fp32) over hidden states and weight
}


def realistic_case(seed: int, tokens: int = 512, hidden: int = 256, vocab: int = 4096,
                   logit_std: float = 3.0, padding: int = 0) -> dict[str, Tensor]:
    """float32 inputs of the fused loss: final hidden states as after an RMSNorm with
    per-channel gains (lognormal, sigma 0.5), output weights giving student logits of std
    ``logit_std``, a teacher correlated with the student, targets sampled from the student,
    group advantages (8 sequences, groups of 4), rollout log-probs 0.05 nats off the
    trainer's; ``padding`` extra weight rows of large values (Megatron's TP padding, to be
    masked with ``vocab_size=vocab``)."""
    gen = torch.Generator().manual_seed(seed)
    gain = torch.exp(0.5 * torch.randn(hidden, generator=gen))

    def normed(x):
        return x / x.pow(2).mean(1, keepdim=True).sqrt() * gain

    h = normed(torch.randn(tokens, hidden, generator=gen))
    w = torch.randn(vocab, hidden, generator=gen)
    w *= logit_std / (h @ w.T).std()
    th = normed(h + 0.5 * torch.randn(tokens, hidden, generator=gen))
    tw = w + 0.3 * w.std() * torch.randn(vocab, hidden, generator=gen)
    logp = torch.log_softmax(h.double() @ w.double().T, -1)
    targets = torch.multinomial(logp.exp(), 1, generator=gen)[:, 0]
    sequences = 8
    advantages = broadcast_to_tokens(group_advantages(torch.randn(sequences, generator=gen), 4),
                                     torch.ones(sequences, tokens // sequences, dtype=torch.bool))
    sampled = logp.gather(1, targets[:, None])[:, 0].float()
    pad = 30.0 * torch.randn(padding, hidden, generator=gen)
    return {"hidden": h, "weight": torch.cat([w, pad]), "teacher_hidden": th,
            "teacher_weight": torch.cat([tw, pad]), "targets": targets,
            "advantages": advantages.reshape(-1),
            "rollout_logp": sampled + 0.05 * torch.randn(tokens, generator=gen)}


def case_batch(case: dict[str, Tensor], dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> TokenBatch:
    """The ``[1, T]`` batch of ``case``; token-mean weights unless it has ``token_weights``."""
    mask = torch.ones(1, case["targets"].shape[0], dtype=torch.bool)
    weights = case.get("token_weights")
    weights = token_weights(mask, "token_mean") if weights is None else weights[None]
    return TokenBatch(loss_mask=mask.to(device), weights=weights.to(device, dtype),
                      targets=case["targets"][None].to(device),
                      advantages=case["advantages"][None].to(device, dtype),
                      rollout_logp=case["rollout_logp"][None].to(device, dtype))


def run_fused(case: dict[str, Tensor], fp8: Fp8LossConfig | None, chunk: int | None = None,
              vocab_size: int | None = None, tp_group=None, rows: slice = slice(None),
              device: str | torch.device = "cpu"):
    """``(loss, grad hidden, grad weight, metrics)`` of the dGRPO fused loss on ``case`` on
    ``device`` (results on the CPU), the output weights restricted to ``rows`` (a TP shard)."""
    hidden = case["hidden"].to(device, copy=True).requires_grad_()
    weight = case["weight"][rows].to(device, copy=True).requires_grad_()
    loss, metrics = loss_from_hidden(DGRPO_FULL_KL, case_batch(case, device=device), hidden[None],
                                     weight, case["teacher_hidden"][None].to(device),
                                     case["teacher_weight"][rows].to(device), tp_group=tp_group,
                                     chunk_tokens=chunk, vocab_size=vocab_size, fp8=fp8)
    loss.backward()
    return loss.detach().cpu(), hidden.grad.cpu(), weight.grad.cpu(), metrics.as_dict()


def cosine(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(),
                                                       b.flatten().double(), dim=0))


def relative(a: Tensor, b: Tensor) -> float:
    """``|a - b| / |b|`` (Frobenius)."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def fp8_error(case: dict[str, Tensor], fp8: Fp8LossConfig, baseline, chunk: int = 128,
              device: str | torch.device = "cpu") -> dict[str, float]:
    """The FP8 fused loss's error on ``case`` against ``baseline`` (:func:`run_fused`
    without FP8), under the names of ``FP8_ERROR_BOUNDS``: the KL error (nats), the loss
    error, and the smaller of the hidden-state and weight gradients' cosines."""
    loss, grad_hidden, grad_weight, metrics = run_fused(case, fp8, chunk=chunk, device=device)
    base_loss, base_hidden, base_weight, base = baseline
    kl_key = "kl_error_nats" if fp8.teacher else "kl_error_nats_teacher_fp32"
    return {kl_key: abs(metrics["kl_teacher"] - base["kl_teacher"]),
            "loss_error": abs(float(loss - base_loss)),
            "grad_cosine": min(cosine(grad_hidden, base_hidden), cosine(grad_weight, base_weight))}


def outside_bounds(errors: dict[str, float]) -> dict[str, float]:
    """The entries of :func:`fp8_error`'s result beyond ``FP8_ERROR_BOUNDS`` (cosines
    below their bound, errors above theirs)."""
    return {name: value for name, value in errors.items()
            if (value < FP8_ERROR_BOUNDS[name] if name == "grad_cosine"
                else value > FP8_ERROR_BOUNDS[name])}
