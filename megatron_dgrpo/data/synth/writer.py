"""Write synthetic examples as sharded parquet (public columns + task metadata), atomically.

Shards go through :func:`megatron_dgrpo.outputs.atomic_output_dir`: a failed or interrupted run leaves no partial
output, and an existing non-empty output directory is refused, never overwritten.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ...outputs import atomic_output_dir
from ..schema import SYNTH_SCHEMA, TEACHER_COLUMNS
from .generator import SynthConfig, SynthGenerator

_WORKER_GENERATOR: SynthGenerator | None = None


def examples_to_table(examples: list, schema: pa.Schema = SYNTH_SCHEMA) -> pa.Table:
    """A table in ``schema`` (:data:`~..schema.SYNTH_SCHEMA` by default) from examples with an
    attribute per column; teacher response columns are null."""
    columns = {name: ([None] * len(examples) if name in TEACHER_COLUMNS else [getattr(e, name) for e in examples])
               for name in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)


def _init_worker(config: SynthConfig) -> None:
    global _WORKER_GENERATOR
    _WORKER_GENERATOR = SynthGenerator(config)


def _write_shard(start: int, stop: int, path: str) -> int:
    examples = list(_WORKER_GENERATOR.examples(start, stop))
    pq.write_table(examples_to_table(examples), path, compression="zstd")
    return stop - start


def _report(done_counts, on_shard_done: Callable[[int], None] | None) -> None:
    """Drain the shard results in order, reporting each to ``on_shard_done``."""
    for done in done_counts:
        if on_shard_done:
            on_shard_done(done)


def write_synth_dataset(
    config: SynthConfig,
    out_dir: str | Path,
    shard_size: int = 1000,
    workers: int = 1,
    on_shard_done: Callable[[int], None] | None = None,
) -> list[Path]:
    """Generate ``config.num_examples`` examples into ``out_dir/part-NNNNN.parquet``; returns the shard paths.

    ``on_shard_done(num_rows)`` is called as each shard completes (for progress bars).
    """
    config.validate()
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if workers <= 0:
        raise ValueError(f"workers must be positive, got {workers}")
    ranges = [
        (s, min(s + shard_size, config.num_examples)) for s in range(0, config.num_examples, shard_size)
    ]
    names = [f"part-{i:05d}.parquet" for i in range(len(ranges))]
    with atomic_output_dir(out_dir) as tmp:
        jobs = [(start, stop, str(tmp / name)) for (start, stop), name in zip(ranges, names)]
        if workers == 1:
            _init_worker(config)
            _report(map(_write_shard, *zip(*jobs)), on_shard_done)
        else:
            with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(config,)) as pool:
                _report(pool.map(_write_shard, *zip(*jobs)), on_shard_done)
    return [Path(out_dir) / name for name in names]
