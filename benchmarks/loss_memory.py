"""Peak memory and time of one forward + backward of a long-sequence loss, on CPU, fp32.

Compared on the same shapes (T tokens, hidden size H, vocabulary V):

* ``materialized``: dGRPO (clipped surrogate + truncated IS + exact full-vocabulary KL to
  the teacher) from full ``[T, V]`` student and teacher logits
  (``megatron_dgrpo.parallel.materialized.loss_from_logits``);
* ``fused``: the same loss from hidden states and output weights, chunk by chunk
  (``megatron_dgrpo.parallel.fused.loss_from_hidden``, default chunk);
* ``fused_fp8``: ``fused`` with the output-layer GEMMs in FP8 (``fp8=Fp8LossConfig()``:
  tensorwise, hybrid; student and teacher). Its peak memory is meaningful here, its time is
  not: CPU ``torch._scaled_mm`` has no FP8 arithmetic (FP8 speed needs a GPU's tensor
  cores, ``benchmarks/loss_memory_cuda.py``);
* ``liger_jsd``: liger-kernel's ``LigerFusedLinearJSDLoss`` (student + teacher output layers,
  JSD + hard CE, ``chunk_size=1024``), compiled with ``torch.compile`` as Liger ships it;
* ``liger_grpo``: liger-kernel's ``LigerFusedLinearGRPOLoss`` (surrogate + k3 KL to a
  reference given as log-probs, no teacher), on ``T / 1024`` sequences of 1024 tokens
  (its chunks are whole sequences).

How memory is measured: every (method, T, V) case runs in a fresh Python subprocess, so
nothing (allocator caches, compiled graphs) carries over between cases. The worker
creates the inputs (hidden states, output weights, per-token signals), runs any
``torch.compile`` warm-up on a T = 1024 slice of the same shapes (so compilation counts in
neither time nor memory), collects garbage, then resets the kernel's peak-RSS counter by
writing ``5`` to ``/proc/self/clear_refs``. After one forward + backward it reads the peak
(``VmHWM``) from ``/proc/self/status``; the reported peak is ``VmHWM`` minus the RSS just
before the call (``VmRSS``): everything the loss and its backward allocate, including the
gradients of the hidden states and of the output weight, and nothing the inputs already
occupied. Time is the wall-clock time of that same call (2 CPU threads). Linux only.

``floor`` = what any fused implementation must hold at once: the two gradients it returns
(output weight ``[V, H]``, hidden states ``[T, H]``) and one chunk of logits ``[chunk, V]``
(the fused loss's default chunk, ``fused_chunk_tokens``), fp32: ``(V*H + T*H + chunk*V) *
4`` bytes. (Until 2026-12-01 the floor left out the hidden-state gradient, an output that
every method allocates: ``T*H*4`` bytes, 64 MiB at T = 16K.) Ratios in the table are
against ``liger_jsd`` measured in the same run.
``materialized`` is skipped when its estimated peak (``5 * T * V * 4`` bytes) exceeds
``--max-gb``.

Usage::

    python benchmarks/loss_memory.py --quick          # small subset (minutes)
    python benchmarks/loss_memory.py                  # T in 2K..16K, V in {32K, 152K} (long)
    python benchmarks/loss_memory.py --tokens 4096 8192 --vocabs 151936 --methods fused liger_jsd
    python benchmarks/loss_memory.py --shapes 2048x32768 8192x151936
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time

METHODS = ("materialized", "fused", "fused_fp8", "liger_jsd", "liger_grpo")
HIDDEN = 1024
LIGER_CHUNK_TOKENS = 1024
FULL_TOKENS = (2048, 4096, 8192, 16384)
FULL_VOCABS = (32768, 151936)
QUICK_CASES = ((2048, 32768), (4096, 32768), (2048, 151936))
MIB = 2 ** 20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _inputs(tokens: int, vocab: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    return {
        "hidden": torch.randn(tokens, HIDDEN, generator=gen).requires_grad_(),
        "weight": (torch.randn(vocab, HIDDEN, generator=gen) * 0.03).requires_grad_(),
        "teacher_hidden": torch.randn(tokens, HIDDEN, generator=gen),
        "teacher_weight": torch.randn(vocab, HIDDEN, generator=gen) * 0.03,
        "targets": torch.randint(0, vocab, (tokens,), generator=gen),
        "advantages": torch.randn(tokens // LIGER_CHUNK_TOKENS + 1, generator=gen),
        "old_logp": -torch.rand(tokens, generator=gen) * 8,
        "rollout_logp": -torch.rand(tokens, generator=gen) * 8,
    }


def _dgrpo_batch(data, tokens: int):
    import torch

    from megatron_dgrpo.algorithms import TokenBatch, token_weights

    mask = torch.ones(1, tokens, dtype=torch.bool)
    sequence = torch.arange(tokens) // LIGER_CHUNK_TOKENS
    return TokenBatch(loss_mask=mask, weights=token_weights(mask, "token_mean"),
                      targets=data["targets"][None], advantages=data["advantages"][sequence][None],
                      old_logp=data["old_logp"][None], rollout_logp=data["rollout_logp"][None])


def _runner(method: str, data, tokens: int):
    """A zero-argument callable doing one forward + backward of ``method`` on ``tokens``."""
    from megatron_dgrpo.algorithms import LossConfig

    config = LossConfig(objective="dgrpo", kl_estimator="full")
    hidden = data["hidden"][:tokens]
    teacher_hidden = data["teacher_hidden"][:tokens]
    if method == "materialized":
        from megatron_dgrpo.parallel.materialized import loss_from_logits

        def run():
            logits = hidden @ data["weight"].T
            teacher_logits = teacher_hidden @ data["teacher_weight"].T
            loss, _ = loss_from_logits(config, _dgrpo_batch(data, tokens), logits[None], teacher_logits[None])
            loss.backward()
    elif method in ("fused", "fused_fp8"):
        from megatron_dgrpo.parallel.fp8 import Fp8LossConfig
        from megatron_dgrpo.parallel.fused import loss_from_hidden

        fp8 = Fp8LossConfig() if method == "fused_fp8" else None

        def run():
            loss, _ = loss_from_hidden(config, _dgrpo_batch(data, tokens), hidden[None], data["weight"],
                                       teacher_hidden[None], data["teacher_weight"], fp8=fp8)
            loss.backward()
    elif method == "liger_jsd":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        jsd = LigerFusedLinearJSDLoss(compiled=True, chunk_size=LIGER_CHUNK_TOKENS)

        def run():
            jsd(hidden, data["weight"], teacher_hidden, data["teacher_weight"],
                data["targets"][:tokens]).backward()
    elif method == "liger_grpo":
        import torch
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        grpo = LigerFusedLinearGRPOLoss(compiled=True, beta=0.04, epsilon_low=0.2, epsilon_high=0.28)
        sequences = tokens // LIGER_CHUNK_TOKENS

        def run():
            shape = (sequences, LIGER_CHUNK_TOKENS)
            loss, _ = grpo(hidden.reshape(*shape, HIDDEN), data["weight"],
                           data["targets"][:tokens].reshape(shape), torch.ones(shape),
                           data["advantages"][:sequences],
                           ref_per_token_logps=data["rollout_logp"][:tokens].reshape(shape),
                           old_per_token_logps=data["old_logp"][:tokens].reshape(shape))
            loss.backward()
    else:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    return run


def measure(method: str, tokens: int, vocab: int) -> dict:
    """Run in a fresh process: peak extra RSS (MiB) and seconds of one forward + backward."""
    import torch

    torch.set_num_threads(2)
    data = _inputs(tokens, vocab)
    if method.startswith("liger"):  # compile on a one-chunk slice first
        _runner(method, data, LIGER_CHUNK_TOKENS)()
        data["hidden"].grad = data["weight"].grad = None
    run = _runner(method, data, tokens)
    gc.collect()
    _reset_peak_rss()
    before_kib = _status_kib("VmRSS")
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    peak_kib = _status_kib("VmHWM")
    return {"peak_mib": (peak_kib - before_kib) / 1024, "seconds": seconds}


def _run_case(method: str, tokens: int, vocab: int) -> dict:
    completed = subprocess.run(
        [sys.executable, __file__, "--worker", method, str(tokens), str(vocab)],
        capture_output=True, text=True, check=False)
    if completed.returncode:
        return {"error": completed.stderr.strip().splitlines()[-1] if completed.stderr else "failed"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _floor_mib(tokens: int, vocab: int) -> float:
    from megatron_dgrpo.parallel.vocab import fused_chunk_tokens

    chunk = min(tokens, fused_chunk_tokens(vocab, HIDDEN))
    return (vocab * HIDDEN + tokens * HIDDEN + chunk * vocab) * 4 / MIB


def _table(results: dict) -> str:
    lines = ["| method | T | V | peak MiB | time s | peak / liger_jsd | time / liger_jsd | peak / floor |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (method, tokens, vocab), result in results.items():
        head = f"| {method} | {tokens} | {vocab} |"
        if "skipped" in result or "error" in result:
            lines.append(f"{head} {result.get('skipped') or result.get('error')} | | | | |")
            continue
        base = results.get(("liger_jsd", tokens, vocab), {})
        memory_ratio = time_ratio = "-"
        if "peak_mib" in base:
            memory_ratio = f"{result['peak_mib'] / base['peak_mib']:.2f}"
            time_ratio = f"{result['seconds'] / base['seconds']:.2f}"
        floor_ratio = result["peak_mib"] / _floor_mib(tokens, vocab)
        lines.append(f"{head} {result['peak_mib']:.0f} | {result['seconds']:.1f} | {memory_ratio} | "
                     f"{time_ratio} | {floor_ratio:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only (T, V) in {QUICK_CASES}")
    parser.add_argument("--tokens", type=int, nargs="+", default=FULL_TOKENS)
    parser.add_argument("--vocabs", type=int, nargs="+", default=FULL_VOCABS)
    parser.add_argument("--shapes", nargs="+", metavar="TxV",
                        help="explicit (T, V) pairs, e.g. 4096x151936; overrides --tokens/--vocabs")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--max-gb", type=float, default=8.0,
                        help="skip materialized when its estimated peak exceeds this")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "T", "V"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        method, tokens, vocab = args.worker
        print(json.dumps(measure(method, int(tokens), int(vocab))))
        return
    if args.quick:
        shapes = QUICK_CASES
    elif args.shapes:
        shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes]
    else:
        shapes = [(t, v) for v in args.vocabs for t in args.tokens]
    results = {}
    for tokens, vocab in shapes:
        for method in args.methods:
            estimate_gb = 5 * tokens * vocab * 4 / 1e9
            if method == "materialized" and estimate_gb > args.max_gb:
                results[method, tokens, vocab] = {"skipped": f"skipped (est. {estimate_gb:.0f} GB)"}
            else:
                results[method, tokens, vocab] = _run_case(method, tokens, vocab)
            print(method, tokens, vocab, results[method, tokens, vocab], file=sys.stderr, flush=True)
    print(f"H={HIDDEN}, fp32, CPU, one forward + backward per case, fresh process per case\n")
    print(_table(results))


if __name__ == "__main__":
    main()
