"""Refit benchmark on CPU: in-place refit vs save-to-disk + reload vs a plain memory copy.

For each Qwen3-shaped model (fp32, trainer TP=1, a colocated in-process vLLM engine):

(a) in-place refit: :func:`megatron_dgrpo.rollout.refit.refit` from the live Megatron model;
(b) disk round trip: write the same HF tensors as safetensors, then have the engine reload
    its weights from that directory (vLLM's ``reload_weights(weights_path=...)``, the
    cheapest disk path; restarting the engine would cost its start-up time on top);
(c) a plain memory copy of the same number of bytes (one ``Tensor.copy_``).

Prints seconds, GB/s (bytes of HF tensors / seconds) and the ratios b/a and a/c, all from
the same run. Targets: (a) >= 10x faster than (b), and (a) within 3x of (c).

    python benchmarks/refit.py            # ~100M and ~500M parameters (2 GB fp32 copy)
    python benchmarks/refit.py --quick    # ~20M and ~60M
"""

from __future__ import annotations

import argparse
import os
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


def time_in_place(engine, model, config, bucket_mb: float) -> tuple[float, int]:
    from megatron_dgrpo.rollout.refit import refit

    best, nbytes = float("inf"), 0
    for _ in range(2):  # the first pass also warms allocator and page tables
        report = refit(engine, model, config, bucket_mb=bucket_mb)
        best, nbytes = min(best, report.seconds), report.bytes
    return best, nbytes


def time_disk_round_trip(engine, model, config, scratch: Path, bucket_mb: float) -> float:
    from megatron_dgrpo.models.convert import write_hf_weights
    from megatron_dgrpo.rollout.refit import hf_weight_buckets

    out = scratch / "saved"
    start = time.perf_counter()
    out.mkdir()
    pairs = (pair for bucket in hf_weight_buckets(model, config, bucket_mb) for pair in bucket)
    write_hf_weights(out, pairs)
    engine.run_on_worker(_reload_from_disk, str(out))
    engine.reset_prefix_cache()
    return time.perf_counter() - start


def _reload_from_disk(worker, path: str) -> None:
    worker.reload_weights(weights_path=path)


def time_memory_copy(nbytes: int) -> float:
    source = torch.ones(nbytes // 4, dtype=torch.float32)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return best


def benchmark(name: str, config: ModelConfig, scratch: Path, bucket_mb: float) -> None:
    from megatron_dgrpo.models.provider import build_gpt_model
    from megatron_dgrpo.rollout.vllm_engine import VLLMEngine

    hf_dir = write_random_hf_dir(config, scratch / name)
    model = build_gpt_model(config, ParallelConfig())
    engine = VLLMEngine(hf_dir, dtype="float32", max_model_len=256, kv_cache_gib=1)
    a, nbytes = time_in_place(engine, model, config, bucket_mb)
    b = time_disk_round_trip(engine, model, config, scratch / name, bucket_mb)
    c = time_memory_copy(nbytes)
    gb = nbytes / 1e9
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{name}: {params:.0f}M parameters, {gb:.2f} GB fp32 (engine start-up "
          f"{engine.startup_seconds:.1f} s)")
    for label, seconds in (("(a) in-place refit", a), ("(b) save + reload from disk", b),
                           ("(c) memory copy", c)):
        print(f"  {label:<28} {seconds:8.3f} s  {gb / seconds:7.2f} GB/s")
    print(f"  b / a = {b / a:.1f}x (target >= 10)   a / c = {a / c:.1f}x (target <= 3)")
    del engine, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="~20M and ~60M models")
    parser.add_argument("--bucket-mb", type=float, default=256.0)
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    from megatron_dgrpo.models.provider import initialize_parallel

    initialize_parallel(ParallelConfig(), seed=0)
    with tempfile.TemporaryDirectory(prefix="refit-bench-") as scratch:
        for name in (("20M", "60M") if args.quick else ("100M", "500M")):
            benchmark(name, SIZES[name], Path(scratch), args.bucket_mb)


if __name__ == "__main__":
    main()
