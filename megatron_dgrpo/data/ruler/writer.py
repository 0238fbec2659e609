"""Write the RULER suite as parquet files, one per (length, task): ``<length>-<task>.parquet``.

The directory is written atomically (:func:`megatron_dgrpo.outputs.atomic_output_dir`): a failed run
leaves nothing, and an existing non-empty directory is refused before any work.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq

from ...outputs import atomic_output_dir, refuse_existing
from ..schema import RULER_SCHEMA
from ..synth.length import format_length
from ..synth.writer import examples_to_table
from .suite import RulerConfig, RulerGenerator


def write_ruler_suite(config: RulerConfig, out_dir: str | Path,
                      on_example: Callable[[], None] | None = None) -> list[Path]:
    """Generate every (length, task) cell of ``config`` into ``out_dir``; returns the file paths.

    ``on_example()`` is called after each example (for progress bars).
    """
    refuse_existing(out_dir)
    generator = RulerGenerator(config)
    generator.fit_cells()
    names = []
    with atomic_output_dir(out_dir) as tmp:
        for length, task in generator.cells():
            examples = []
            for example in generator.cell_examples(length, task):
                examples.append(example)
                if on_example:
                    on_example()
            name = f"{format_length(length)}-{task}.parquet"
            pq.write_table(examples_to_table(examples, RULER_SCHEMA), tmp / name, compression="zstd")
            names.append(name)
    return [Path(out_dir) / name for name in names]
