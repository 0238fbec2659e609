"""Throughput of the synthetic generator (``dgrpo data synth``), in examples/s and tokens/s.

Rows: each task family at 4K tokens and all families at 4K and 16K, generated in-process (one core),
plus the end-to-end writer (generation + parquet/zstd) for ``--num`` 4K examples with ``--workers``.
Baseline, measured in the same run: assembling the same number of tokens from the pre-built filler
bank with no tasks, needles or layout (sample + join), the floor any generator pays; the "x baseline"
column is each row's time per token over the baseline's (the writer row includes parquet encoding
and runs on ``--workers`` processes, so its ratio is wall time per token, not CPU time). Tokens are
counted by the documented approximation (megatron_dgrpo.data.synth.length.ApproxTokenCounter).

    python benchmarks/synth_throughput.py              # full run (10,000 x 4K written)
    python benchmarks/synth_throughput.py --num 1000   # quicker
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from megatron_dgrpo.data.synth import TASK_FAMILIES, SynthConfig, SynthGenerator
from megatron_dgrpo.data.synth.writer import write_synth_dataset


def timed_generation(config: SynthConfig, count: int) -> tuple[float, int]:
    generator = SynthGenerator(config)
    start = time.perf_counter()
    tokens = sum(generator.example(i).num_tokens for i in range(count))
    return time.perf_counter() - start, tokens


def timed_filler_baseline(length: int, count: int) -> tuple[float, int]:
    generator = SynthGenerator(SynthConfig(lengths=(length,)))
    bank, rng = generator.builder.bank, random.Random(0)
    start = time.perf_counter()
    tokens = 0
    for _ in range(count):
        sentences = bank.sample(rng, length)
        " ".join(s.text for s in sentences)
        tokens += sum(s.tokens for s in sentences)
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num", type=int, default=10_000, help="examples for the end-to-end writer row")
    parser.add_argument("--per-row", type=int, default=400, help="examples per in-process 4K row")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    rows = []
    base_time, base_tokens = timed_filler_baseline(4096, args.per_row)
    rows.append(("baseline: filler only, 4K", args.per_row, base_time, base_tokens))
    for family in TASK_FAMILIES:
        config = SynthConfig(lengths=(4096,), tasks=(family,))
        rows.append((f"{family}, 4K", args.per_row, *timed_generation(config, args.per_row)))
    rows.append(
        ("all families, 4K", args.per_row, *timed_generation(SynthConfig(lengths=(4096,)), args.per_row))
    )
    count16 = max(1, args.per_row // 4)
    rows.append(("all families, 16K", count16, *timed_generation(SynthConfig(lengths=(16384,)), count16)))
    with tempfile.TemporaryDirectory() as tmp:
        config = SynthConfig(num_examples=args.num, lengths=(4096,))
        start = time.perf_counter()
        write_synth_dataset(config, Path(tmp) / "out", shard_size=1000, workers=args.workers)
        elapsed = time.perf_counter() - start
        written_tokens = pq.read_table(Path(tmp) / "out", columns=["num_tokens"]).column(0).to_numpy().sum()
    rows.append((f"written to parquet, 4K, {args.workers} workers", args.num, elapsed, int(written_tokens)))

    base_rate = base_tokens / base_time
    print(
        f"{'row':<40} {'examples':>8} {'seconds':>8} {'examples/s':>11} {'tokens/s':>11} {'x baseline':>10}"
    )
    for name, count, seconds, tokens in rows:
        print(
            f"{name:<40} {count:>8} {seconds:>8.2f} {count / seconds:>11,.0f} {tokens / seconds:>11,.0f} "
            f"{base_rate / (tokens / seconds):>10.2f}"
        )


if __name__ == "__main__":
    main()
