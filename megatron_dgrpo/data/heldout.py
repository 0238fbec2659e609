"""What a run trains on, read cheaply: the ids and the answer keys of the training rows.

An evaluation during training needs two things from the training set: its ids (a held-out set
that shares one is refused: it would score the run on rows it trains on) and its answers per task
and question template (the no-context baseline, :mod:`.baseline`, is fit on them).
:func:`read_training_rows` reads only the short columns of the parquet files (id, source,
language, question, answer and the synthetic task metadata), never the documents, and tokenizes
nothing, so it takes seconds where loading the rows would take hours.

A row counts as a training row when the loader of the same :class:`~.longblocks.LongBlocksConfig`
keeps it by choice (:func:`~.longblocks.filter_reason`: split, languages, sources) and its id,
source, question and answer are non-empty strings. Documents are not read, so a row the loader
would skip for a missing document still counts: the check errs on the side of refusing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow.parquet as pq

from .baseline import FitRow
from .evaluate import family_of
from .longblocks import LongBlocksConfig, filter_reason, parquet_files

logger = logging.getLogger(__name__)

_COLUMNS = ("id", "source", "language", "question", "answer", "task_family", "task",
            "question_template")
_NEEDED = ("id", "source", "question", "answer")


@dataclass(frozen=True)
class TrainingRows:
    """The training rows' ``ids`` and their :class:`~.baseline.FitRow` s (one per row, in file
    order)."""

    ids: frozenset[str]
    fit_rows: tuple[FitRow, ...]


def _usable(row: dict) -> bool:
    return all(isinstance(row.get(c), str) and row[c].strip() for c in _NEEDED)


def read_training_rows(config: LongBlocksConfig, batch_rows: int = 65536) -> TrainingRows:
    """The rows of ``config.paths`` the run trains on (see the module docstring); unreadable
    files are skipped with a warning, as the loader skips them."""
    ids: set[str] = set()
    fit_rows: list[FitRow] = []
    for path in parquet_files(config.paths):
        try:
            parquet = pq.ParquetFile(path)
            columns = [c for c in _COLUMNS if c in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
                for row in batch.to_pylist():
                    if filter_reason(config, row) is None and _usable(row):
                        ids.add(row["id"])
                        fit_rows.append(FitRow(family_of(row, row["source"]), row.get("task"),
                                               row.get("question_template"), row["answer"]))
        except (OSError, ValueError) as error:  # pyarrow: ArrowInvalid (a ValueError) / OSError
            logger.warning("skipping unreadable parquet file %s: %s", path, error)
    return TrainingRows(frozenset(ids), tuple(fit_rows))


__all__ = ["TrainingRows", "read_training_rows"]
