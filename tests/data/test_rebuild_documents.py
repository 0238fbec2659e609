"""`dgrpo data rebuild-documents` on fabricated shards in the institutional-books-1.0 schema."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_dgrpo.cli import main
from megatron_dgrpo.data.longblocks import LongBlocksConfig, scan
from megatron_dgrpo.data.rebuild import NOTICE
from megatron_dgrpo.data.schema import INSTITUTIONAL_BOOKS, PUBLIC_SCHEMA

BOOKS_SCHEMA = pa.schema([  # the published column names and types (plus one unused column)
    ("barcode_src", pa.string()), ("title_src", pa.string()),
    ("ocr_score_src", pa.int64()), ("ocr_score_gen", pa.int64()),
    ("text_by_page_src", pa.list_(pa.string())), ("text_by_page_gen", pa.list_(pa.string())),
])


def _book(barcode, src_score, gen_score, src_pages, gen_pages):
    return {"barcode_src": barcode, "title_src": f"Title {barcode}", "ocr_score_src": src_score,
            "ocr_score_gen": gen_score, "text_by_page_src": src_pages, "text_by_page_gen": gen_pages}


BOOKS = [
    _book("B1", 90, 80, ["src one", "src two"], ["gen one", "gen two"]),  # src scores higher
    _book("B2", 70, 95, ["s1"], ["g1", "", "g3"]),  # gen higher; empty page kept
    _book("B3", 60, 99, ["only src"], None),  # gen higher but absent: src
    _book("B4", 88, 88, ["tie src"], ["tie gen"]),  # tie: src
    _book("B5", 50, 50, ["unused"], ["unused"]),
    _book("B6", 50, 60, ["", " "], []),  # no text at all
    _book("B8", None, 40, ["no src score"], ["gen wins"]),  # missing src score: gen
]


def _row(row_id, source=INSTITUTIONAL_BOOKS, document=None):
    return {"id": row_id, "document": document, "source": source, "language": "en",
            "question": f"Question about {row_id}?", "answer": "an answer",
            "response_Qwen3-Next-80B-A3B": None, "response_Qwen3.5-27B": "r",
            "response_Nemotron-3-Nano-30B-A3B": None}


@pytest.fixture
def dirs(tmp_path):
    books, data = tmp_path / "books", tmp_path / "data"
    (books / "shard").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(BOOKS[:3], schema=BOOKS_SCHEMA), books / "a.parquet",
                   row_group_size=2)
    pq.write_table(pa.Table.from_pylist(BOOKS[3:], schema=BOOKS_SCHEMA),
                   books / "shard" / "b.parquet", row_group_size=3)
    (data / "sub").mkdir(parents=True)
    first = [_row("B1"), _row("w1", "wiki", "A wiki document."), _row("B2"), _row("B7"),
             _row("w2", "wiki")]  # B7: not in the books; w2: null, but not a book row
    second = [_row("B3"), _row("B4"), _row("B1"), _row("B6"), _row("B8")]
    pq.write_table(pa.Table.from_pylist(first, schema=PUBLIC_SCHEMA), data / "train-0.parquet",
                   row_group_size=2)
    pq.write_table(pa.Table.from_pylist(second, schema=PUBLIC_SCHEMA), data / "sub" / "train-1.parquet")
    return books, data, tmp_path / "out"


def _rebuild(books, data, out, *extra):
    return main(["data", "rebuild-documents", "--books", str(books), "--data", str(data),
                 "--out", str(out), *extra])


def test_documents_are_rebuilt_by_ocr_score_and_everything_else_is_unchanged(dirs, capsys):
    books, data, out = dirs
    assert _rebuild(books, data, out) == 0
    printed = capsys.readouterr()
    assert "rebuilt 6 of 8 null documents (1 not found in the books, 1 without text) in 10 rows" in printed.out
    assert NOTICE in printed.err and "non-commercial" in NOTICE and "no redistribution" in NOTICE
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "NOTICE.txt", "rebuild_summary.json", "sub/train-1.parquet", "train-0.parquet"]
    for name in ("train-0.parquet", "sub/train-1.parquet"):
        before, after = pq.read_table(data / name), pq.read_table(out / name)
        assert after.schema == before.schema
        assert after.drop_columns(["document"]).equals(before.drop_columns(["document"]))
    documents = {(r["id"], r["question"]): r["document"] for name in ("train-0.parquet", "sub/train-1.parquet")
                 for r in pq.read_table(out / name).to_pylist()}
    assert [documents[(i, f"Question about {i}?")] for i in ("B1", "B2", "B3", "B4", "B6", "B7", "B8")] == [
        "src one\nsrc two", "g1\n\ng3", "only src", "tie src", None, None, "gen wins"]
    assert documents[("w1", "Question about w1?")] == "A wiki document."
    assert documents[("w2", "Question about w2?")] is None
    assert json.loads((out / "rebuild_summary.json").read_text()) == {
        "rows": 10, "null_documents": 8, "rebuilt": 6, "not_found": 1, "no_text": 1, "books_files": 2}
    remaining = scan(LongBlocksConfig(paths=(str(out),), allow_unusable=True))
    assert remaining.unusable["missing document"] == 3  # B6, B7 and the wiki row


def test_the_page_separator_is_an_option(dirs):
    books, data, out = dirs
    assert _rebuild(books, data, out, "--page-separator", "blank-line") == 0
    rows = pq.read_table(out / "train-0.parquet").to_pylist()
    assert rows[0]["document"] == "src one\n\nsrc two"


def test_existing_output_bad_books_and_nested_output_are_refused(dirs, capsys):
    books, data, out = dirs
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert _rebuild(books, data, out) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]

    pq.write_table(pa.Table.from_pylist([{"barcode_src": "B9", "text_by_page_src": ["x"]}]),
                   books / "shard" / "c.parquet")
    assert _rebuild(books, data, out.parent / "new") == 2
    err = capsys.readouterr().err
    assert "c.parquet lacks the column(s) text_by_page_gen, ocr_score_src, ocr_score_gen" in err
    assert not (out.parent / "new").exists()
    assert _rebuild(books, data, data / "inside") == 2
    assert "lies inside --data" in capsys.readouterr().err
