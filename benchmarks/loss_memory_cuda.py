"""Peak GPU memory and time of one forward + backward of the dGRPO loss, fused vs materialised.

The GPU counterpart of ``benchmarks/loss_memory.py`` (which measures CPU RSS). Same loss
(clipped surrogate + truncated IS + exact full-vocabulary KL to the teacher), same inputs:
hidden states ``[T, H]`` and output weights ``[V, H]`` for student and teacher.

* ``materialized``: ``loss_from_logits`` on full ``[T, V]`` student and teacher logits;
* ``fused``: ``loss_from_hidden``, chunk by chunk (default chunk size);
* ``fused FP8``: the same with the output-layer GEMMs in FP8 (``--fp8-recipe``, hybrid
  format; skipped with ``none`` or on GPUs below compute capability 8.9).

Peak = ``torch.cuda.max_memory_allocated`` during the call minus the memory allocated just
before it (the inputs): what the loss and its backward add, gradients of the hidden states
and of the output weight included. Time = median of ``--repeats`` calls after one warm-up,
with ``torch.cuda.synchronize`` around each. Ratios are fused / materialized from the same
run. ``materialized`` is skipped when its estimated peak (``5 * T * V * 4`` bytes) does not
fit in the free memory.

    python benchmarks/loss_memory_cuda.py                       # H=4096, V=151936, T=4K..64K
    python benchmarks/loss_memory_cuda.py --tokens 8192 --hidden 2048 --dtype bf16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

MIB = 2 ** 20


def _inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)

    return {"hidden": randn(1, tokens, hidden).requires_grad_(),
            "weight": randn(vocab, hidden, scale=0.02).requires_grad_(),
            "teacher_hidden": randn(1, tokens, hidden),
            "teacher_weight": randn(vocab, hidden, scale=0.02),
            "targets": torch.randint(0, vocab, (1, tokens), generator=gen, device="cuda"),
            "advantages": torch.randn(1, tokens, generator=gen, device="cuda"),
            "old_logp": -torch.rand(1, tokens, generator=gen, device="cuda") * 8,
            "rollout_logp": -torch.rand(1, tokens, generator=gen, device="cuda") * 8}


def _step(method: str, data: dict) -> None:
    from megatron_dgrpo.algorithms import LossConfig, TokenBatch, token_weights
    from megatron_dgrpo.parallel.fp8 import Fp8LossConfig
    from megatron_dgrpo.parallel.fused import loss_from_hidden
    from megatron_dgrpo.parallel.materialized import loss_from_logits

    config = LossConfig(objective="dgrpo", kl_estimator="full")
    mask = torch.ones_like(data["targets"], dtype=torch.bool)
    batch = TokenBatch(loss_mask=mask, weights=token_weights(mask, "token_mean"),
                       targets=data["targets"], advantages=data["advantages"],
                       old_logp=data["old_logp"], rollout_logp=data["rollout_logp"])
    if method.startswith("fused"):
        recipe = method.partition(":")[2]
        loss, _ = loss_from_hidden(config, batch, data["hidden"], data["weight"],
                                   data["teacher_hidden"], data["teacher_weight"],
                                   fp8=Fp8LossConfig(recipe=recipe) if recipe else None)
    else:
        loss, _ = loss_from_logits(config, batch, data["hidden"] @ data["weight"].T,
                                   data["teacher_hidden"] @ data["teacher_weight"].T)
    loss.backward()
    data["hidden"].grad = data["weight"].grad = None


def measure(method: str, tokens: int, hidden: int, vocab: int, dtype: torch.dtype,
            repeats: int) -> dict:
    """Peak added MiB and median seconds of one forward + backward."""
    data = _inputs(tokens, hidden, vocab, dtype)
    _step(method, data)  # warm-up (kernels, allocator)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        _step(method, data)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - before) / MIB
    del data
    torch.cuda.empty_cache()
    return {"peak_mib": peak, "seconds": statistics.median(seconds)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fp8-recipe", choices=("tensorwise", "rowwise", "none"),
                        default="tensorwise")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("loss_memory_cuda.py needs a CUDA GPU; on CPU use benchmarks/loss_memory.py")
    fp8 = args.fp8_recipe != "none" and torch.cuda.get_device_capability() >= (8, 9)
    torch.backends.cuda.matmul.allow_tf32 = True  # what a training run would use
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    print(f"{torch.cuda.get_device_name()}, H={args.hidden}, V={args.vocab}, inputs {args.dtype}, "
          f"TF32 matmuls, one forward + backward, median of {args.repeats}\n")
    print("| T | materialized MiB | fused MiB | fused / materialized memory | "
          "materialized s | fused s | fused / materialized time | fused FP8 MiB | "
          "fused FP8 s | FP8 / fused time |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for tokens in args.tokens:
        free, _ = torch.cuda.mem_get_info()
        fused = measure("fused", tokens, args.hidden, args.vocab, dtype, args.repeats)
        row = (f"| {tokens} | does not fit | {fused['peak_mib']:.0f} | - | - | "
               f"{fused['seconds']:.3f} | - |")
        if 5 * tokens * args.vocab * 4 < 0.8 * free:
            base = measure("materialized", tokens, args.hidden, args.vocab, dtype, args.repeats)
            row = (f"| {tokens} | {base['peak_mib']:.0f} | {fused['peak_mib']:.0f} | "
                   f"{fused['peak_mib'] / base['peak_mib']:.3f} | {base['seconds']:.3f} | "
                   f"{fused['seconds']:.3f} | {fused['seconds'] / base['seconds']:.2f} |")
        if fp8:
            quantised = measure(f"fused:{args.fp8_recipe}", tokens, args.hidden, args.vocab, dtype,
                                args.repeats)
            row += (f" {quantised['peak_mib']:.0f} | {quantised['seconds']:.3f} | "
                    f"{quantised['seconds'] / fused['seconds']:.2f} |")
        else:
            row += " - | - | - |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
