"""Embedded-engine decoding with keys rotated once when cached vs Megatron's re-rotation.

Megatron's ``SelfAttention`` stores un-rotated keys in its static KV cache and applies the
rotary embedding to the whole cache at every decode step;
:class:`~megatron_dgrpo.models.sdpa_attention.RotatedCacheSelfAttention` (the local spec's
attention) rotates each key once, when it is cached. This benchmark generates with the same
model object both ways (switching each attention layer's class between the two, so the
weights are the very same tensors), alternating ``--rounds`` times, and reports the median
seconds of ``EmbeddedEngine.generate`` and their ratio; the greedy responses of the two must
be identical. Default shape: ``benchmarks/e2e_step.py``'s ``long`` workload (the 13M-parameter
Qwen3, one prompt of 2112 tokens, G=4, 64 new tokens).

    .venv/bin/python benchmarks/rotated_cache.py [--prompt-tokens 2112] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_step import MODEL_13M  # noqa: E402  (a sibling script, not a package)


def worker(rank: int, world_size: int, args: argparse.Namespace) -> dict:
    import torch
    from megatron.core.transformer.attention import SelfAttention

    from megatron_dgrpo.models.config import ParallelConfig
    from megatron_dgrpo.models.provider import build_gpt_model, initialize_parallel
    from megatron_dgrpo.models.sdpa_attention import RotatedCacheSelfAttention
    from megatron_dgrpo.rollout.embedded import EmbeddedEngine
    from megatron_dgrpo.rollout.engine import SamplingParams

    torch.set_num_threads(args.threads)
    initialize_parallel(ParallelConfig(), seed=0)
    model = build_gpt_model(MODEL_13M, ParallelConfig()).eval()
    engine = EmbeddedEngine(model, vocab_size=MODEL_13M.vocab_size)
    prompt = torch.randint(0, MODEL_13M.vocab_size, (args.prompt_tokens,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(n=args.group, temperature=0.0, max_new_tokens=args.new_tokens)
    layers = [m for m in model.modules() if isinstance(m, SelfAttention)]
    seconds = {"megatron": [], "rotated": []}
    responses = {}
    for _ in range(args.rounds):
        for name, cls in (("megatron", SelfAttention), ("rotated", RotatedCacheSelfAttention)):
            for layer in layers:
                layer.__class__ = cls
            start = time.perf_counter()
            batch = engine.generate([prompt], params)
            seconds[name].append(time.perf_counter() - start)
            responses[name] = [r.response_ids for r in batch.rollouts]
    return {"seconds": seconds, "same": responses["megatron"] == responses["rotated"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=2112)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from megatron_dgrpo.parallel.launch import run_distributed

    result = run_distributed(worker, 1, args=(args,), timeout_s=3600)[0]
    if not result["same"]:
        raise SystemExit("the two attentions decoded different greedy responses")
    medians = {k: statistics.median(v) for k, v in result["seconds"].items()}
    print(f"13M Qwen3, 1 prompt of {args.prompt_tokens} tokens x G={args.group} x "
          f"{args.new_tokens} new tokens, greedy, {args.threads} threads, {args.rounds} rounds")
    print("| attention | generate s (median) | all rounds |")
    print("|---|---|---|")
    for name, values in result["seconds"].items():
        print(f"| {name} | {medians[name]:.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    print(f"rotated / megatron: {medians['rotated'] / medians['megatron']:.2f}x time; "
          "greedy responses identical")


if __name__ == "__main__":
    main()
