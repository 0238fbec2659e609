"""Start-up scan: unusable rows counted per reason and source from the columns (no tokenizing),
logged loudly, and training refused above ``data.max_unusable_fraction`` unless allowed."""

import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_dgrpo.config import load_config
from megatron_dgrpo.data.longblocks import LongBlocksConfig, LongBlocksLoader, scan
from megatron_dgrpo.data.schema import INSTITUTIONAL_BOOKS, PUBLIC_SCHEMA, TEACHER_COLUMNS


def _public_like(public_row, books: int, good: int) -> list[dict]:
    """``books`` Institutional-Books rows without documents interleaved with ``good`` wiki rows,
    the last wiki row with an empty question."""
    rows = [public_row(i, document=None, source=INSTITUTIONAL_BOOKS) for i in range(books)]
    rows += [public_row(books + i) for i in range(good - 1)] + [public_row(books + good, question=" ")]
    return rows[::2] + rows[1::2]  # mixed row groups: null counts undecided by the statistics


@pytest.mark.parametrize("statistics", [True, False])
def test_public_like_data_is_counted_and_refused(tmp_path, public_row, statistics, caplog):
    rows = _public_like(public_row, books=11, good=9)
    pq.write_table(pa.Table.from_pylist(rows, schema=PUBLIC_SCHEMA), tmp_path / "a.parquet",
                   row_group_size=3, write_statistics=statistics)
    config = LongBlocksConfig(paths=(str(tmp_path),))
    with pytest.raises(ValueError) as error:
        scan(config)
    message = str(error.value)
    assert "60.0% of the rows are unusable, more than data.max_unusable_fraction=0.05" in message
    assert f"missing document: 11 rows (tokens unknown: no document; {INSTITUTIONAL_BOOKS}: 11)" in message
    assert "empty question: 1 rows (wiki: 1)" in message
    assert "dgrpo data rebuild-documents" in message and "data.allow_unusable=true" in message

    caplog.clear()
    summary = scan(LongBlocksConfig(paths=(str(tmp_path),), allow_unusable=True))
    assert (summary.rows, summary.filtered, summary.unusable_rows) == (20, 0, 12)
    assert dict(summary.unusable) == {"missing document": 11, "empty question": 1}
    assert summary.unusable_fraction == pytest.approx(12 / 20)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unusable 12 of 20 (60.0%)" in warnings[0].getMessage()
    assert scan(LongBlocksConfig(paths=(str(tmp_path),), max_unusable_fraction=0.6)).unusable_rows == 12


def test_rows_filtered_out_by_source_do_not_count(tmp_path, public_row):
    rows = _public_like(public_row, books=30, good=21)
    pq.write_table(pa.Table.from_pylist(rows, schema=PUBLIC_SCHEMA), tmp_path / "a.parquet")
    summary = scan(LongBlocksConfig(paths=(str(tmp_path),), sources=("wiki",)))
    assert (summary.rows, summary.filtered, summary.unusable_rows) == (51, 30, 1)
    assert summary.unusable_fraction == pytest.approx(1 / 21)  # under 5%: no refusal


def test_scan_agrees_with_the_row_by_row_loader(tmp_path, public_row, write_parquet, hf_tokenizer_dir):
    from megatron_dgrpo.data.chat import load_chat_tokenizer

    rows = [public_row(0), public_row(1, document=None), public_row(2, question=""),
            public_row(3, answer="   "), public_row(4, language=None), public_row(5)]
    write_parquet(tmp_path / "a.parquet", rows, schema=PUBLIC_SCHEMA)
    write_parquet(tmp_path / "b.parquet", [dict(public_row(6), id=6)])  # integer ids
    write_parquet(tmp_path / "c.parquet", [{k: v for k, v in public_row(7).items() if k != "question"}])
    write_parquet(tmp_path / "d.parquet", [dict(public_row(8), **{TEACHER_COLUMNS[1]: ["a", "b"]}),
                                           dict(public_row(9), **{TEACHER_COLUMNS[1]: None})])
    config = LongBlocksConfig(paths=(str(tmp_path),), split="all", allow_unusable=True)
    loader = LongBlocksLoader(config, load_chat_tokenizer(hf_tokenizer_dir))
    kept = len(list(loader))
    summary = scan(config)
    assert dict(summary.unusable) == dict(loader.summary.skipped)
    assert summary.rows - summary.unusable_rows == kept == 3
    assert set(summary.unusable) == {"missing document", "empty question", "empty answer",
                                     "missing language", "wrong_type id", "missing question",
                                     f"wrong_type {TEACHER_COLUMNS[1]}"}


def test_an_unreadable_file_is_named_and_refused(tmp_path, public_row, write_parquet):
    write_parquet(tmp_path / "a.parquet", [public_row(0)], schema=PUBLIC_SCHEMA)
    (tmp_path / "b.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="1 data files cannot be read") as error:
        scan(LongBlocksConfig(paths=(str(tmp_path),)))
    assert "b.parquet" in str(error.value)
    assert scan(LongBlocksConfig(paths=(str(tmp_path),), allow_unusable=True)).unreadable_files


def test_the_options_live_in_the_trainers_data_section(tmp_path):
    from megatron_dgrpo.train.config import RunConfig

    with pytest.raises(ValueError, match="max_unusable_fraction"):
        LongBlocksConfig(paths=("x",), max_unusable_fraction=1.5).validate()
    fields = RunConfig.__dataclass_fields__
    assert fields["data"].default_factory is LongBlocksConfig
    data = load_config(LongBlocksConfig, None, ["paths=[x]", "allow_unusable=true",
                                               "max_unusable_fraction=0.5"])
    assert data.allow_unusable is True and data.max_unusable_fraction == 0.5
