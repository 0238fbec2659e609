"""Fixtures for data tests: LongBlocks-schema rows and a parquet writer (tokenizers: tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_dgrpo.data.schema import PUBLIC_COLUMNS


def _public_row(index: int, **overrides) -> dict:
    row = {
        "id": f"row-{index}",
        "document": f"Document {index}. The sky in this story is green.",
        "source": "wiki",
        "language": "en",
        "question": "What colour is the sky?",
        "answer": "green",
        PUBLIC_COLUMNS[6]: "Answer: green",
        PUBLIC_COLUMNS[7]: None,
        PUBLIC_COLUMNS[8]: "",
    }
    row.update(overrides)
    return row


def _write_parquet(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


@pytest.fixture
def public_row():
    """``public_row(index, **overrides)``: a well-formed LongBlocks row dict with fields replaced."""
    return _public_row


@pytest.fixture
def write_parquet():
    """``write_parquet(path, rows, schema=None)``: write row dicts as one parquet file (types inferred)."""
    return _write_parquet
