"""``dgrpo data rebuild-documents``: fill the null documents of public LongBlocks rows from a local
copy of ``institutional/institutional-books-1.0``, as the LongBlocks dataset card describes.

    dgrpo data rebuild-documents --books BOOKS_DIR --data LONGBLOCKS_DIR --out NEW_DIR

LongBlocks ships its ``Institutional-Books-1.0`` rows (107,817, 55.6%) with ``document = null``
and the book's barcode as ``id``. For each such row the book is looked up by barcode and its
document is ``text_by_page_src`` or ``text_by_page_gen``, whichever has the higher OCR score
(``ocr_score_src`` vs ``ocr_score_gen``; a tie or a missing score goes to ``_src``; if the chosen
pages are missing or all empty, the other ones), its pages joined by ``page_separator``.

Column names (:class:`BooksColumns`) follow the collection's published schema (the "HuggingFace
output format" table of the institutional/institutional-books-1-pipeline README):
``barcode_src`` string, ``ocr_score_src`` / ``ocr_score_gen`` int (0-100), ``text_by_page_src`` /
``text_by_page_gen`` list<string>. The card's "join the pages" does not name a separator: the
default is a newline (``--page-separator``).

Three passes; memory holds the needed barcodes, one row group's text columns and the documents
of one LongBlocks file:

1. the LongBlocks files: which barcodes each file needs (ids, sources and the document null mask);
2. the books files, row group by row group: barcodes first, the scores and text columns only for
   row groups that hold a needed book; each document goes to a work file per LongBlocks file;
3. each LongBlocks file is rewritten batch by batch, same relative path and schema, documents
   filled in; other rows and columns unchanged.

``OUT`` appears complete or not at all and an existing non-empty one is refused. It also holds
``rebuild_summary.json`` (the counts) and ``NOTICE.txt``: rebuilt rows fall under the Institutional
Books 1.0 terms (non-commercial use, no redistribution).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..outputs import OutputExistsError, atomic_output_dir, refuse_existing
from .longblocks import column_null_mask, parquet_files
from .schema import INSTITUTIONAL_BOOKS

NOTICE = ("NOTICE: documents rebuilt from Institutional Books 1.0 "
          "(institutional/institutional-books-1.0) fall under that collection's terms: "
          "non-commercial use only, no redistribution. Do not publish or share the rebuilt rows.")
SEPARATORS = {"newline": "\n", "blank-line": "\n\n", "space": " ", "none": ""}
_WORK_SCHEMA = pa.schema([("id", pa.string()), ("document", pa.large_string())])


@dataclass(frozen=True)
class BooksColumns:
    """Column names of the books parquet files (defaults: the published schema)."""

    barcode: str = "barcode_src"
    text_src: str = "text_by_page_src"
    text_gen: str = "text_by_page_gen"
    score_src: str = "ocr_score_src"
    score_gen: str = "ocr_score_gen"


@dataclass
class RebuildSummary:
    """Counts of a rebuild: rows of the LongBlocks files and what happened to the null ones."""

    rows: int = 0
    null_documents: int = 0  # Institutional-Books rows with document = null
    rebuilt: int = 0
    not_found: int = 0  # barcode absent from the books files
    no_text: int = 0  # book found, but no non-empty page in either text column
    books_files: int = 0


def document_of(row: dict, columns: BooksColumns, separator: str) -> str | None:
    """The book's pages by the higher OCR score, joined; None if neither column has text."""
    score_src, score_gen = row.get(columns.score_src), row.get(columns.score_gen)
    prefer_gen = score_gen is not None and (score_src is None or score_gen > score_src)
    order = (columns.text_gen, columns.text_src) if prefer_gen else (columns.text_src, columns.text_gen)
    for column in order:
        pages = row.get(column)
        if pages and any(page and page.strip() for page in pages):
            return separator.join(page or "" for page in pages)
    return None


def _needed_barcodes(files: list[Path]) -> dict[str, set[int]]:
    """Barcode -> indices of the LongBlocks files with a null-document Institutional-Books row."""
    needed: dict[str, set[int]] = defaultdict(set)
    for index, path in enumerate(files):
        parquet = pq.ParquetFile(path)
        _require_columns(path, parquet, ("id", "source", "document"), "LongBlocks")
        for group in range(parquet.metadata.num_row_groups):
            null = column_null_mask(parquet, group, "document")
            if not null.any():
                continue
            small = parquet.read_row_group(group, columns=["id", "source"]).to_pydict()
            for row_id, source, is_null in zip(small["id"], small["source"], null):
                if is_null and source == INSTITUTIONAL_BOOKS and isinstance(row_id, str):
                    needed[row_id].add(index)
    return needed


def _require_columns(path: Path, parquet: pq.ParquetFile, names, what: str) -> None:
    missing = [name for name in names if name not in parquet.schema_arrow.names]
    if missing:
        raise ValueError(f"{what} file {path} lacks the column(s) {', '.join(missing)}")


class _WorkFiles:
    """Documents found so far, appended to one parquet work file per LongBlocks file."""

    def __init__(self, root: Path, flush_rows: int = 64) -> None:
        self.root, self.flush_rows = root, flush_rows
        self._writers: dict[int, pq.ParquetWriter] = {}
        self._buffers: dict[int, list[dict]] = defaultdict(list)

    def add(self, file_index: int, barcode: str, document: str) -> None:
        self._buffers[file_index].append({"id": barcode, "document": document})
        if len(self._buffers[file_index]) >= self.flush_rows:
            self._flush(file_index)

    def _flush(self, file_index: int) -> None:
        if file_index not in self._writers:
            self._writers[file_index] = pq.ParquetWriter(self.path(file_index), _WORK_SCHEMA)
        self._writers[file_index].write_table(
            pa.Table.from_pylist(self._buffers.pop(file_index), schema=_WORK_SCHEMA))

    def close(self) -> None:
        for file_index in list(self._buffers):
            self._flush(file_index)
        for writer in self._writers.values():
            writer.close()

    def path(self, file_index: int) -> Path:
        return self.root / f"{file_index:06d}.parquet"

    def documents(self, file_index: int) -> dict[str, str]:
        path = self.path(file_index)
        if not path.exists():
            return {}
        table = pq.read_table(path).to_pydict()
        return dict(zip(table["id"], table["document"]))


def _extract_books(books: list[Path], needed: dict[str, set[int]], columns: BooksColumns,
                   separator: str, work: _WorkFiles, summary: RebuildSummary) -> set[str]:
    """Pass 2: every needed book's document into the work files (first occurrence wins);
    returns the barcodes found without text."""
    found: set[str] = set()
    textless: set[str] = set()
    for path in books:
        parquet = pq.ParquetFile(path)
        _require_columns(path, parquet, asdict(columns).values(),
                         "institutional/institutional-books-1.0")
        summary.books_files += 1
        for group in range(parquet.metadata.num_row_groups):
            barcodes = parquet.read_row_group(group, columns=[columns.barcode]).column(0).to_pylist()
            wanted = [i for i, code in enumerate(barcodes) if code in needed and code not in found]
            if not wanted:
                continue
            fields = [columns.score_src, columns.score_gen, columns.text_src, columns.text_gen]
            rows = parquet.read_row_group(group, columns=fields).take(wanted).to_pylist()
            for position, row in zip(wanted, rows):
                barcode = barcodes[position]
                found.add(barcode)
                document = document_of(row, columns, separator)
                if document is None:
                    textless.add(barcode)
                    continue
                for file_index in needed[barcode]:
                    work.add(file_index, barcode, document)
    work.close()
    return textless


def _rewrite(source: Path, target: Path, documents: dict[str, str], textless: set[str],
             summary: RebuildSummary, batch_rows: int) -> None:
    """Pass 3: ``source`` copied to ``target`` batch by batch with the null documents filled."""
    parquet = pq.ParquetFile(source)
    schema = parquet.schema_arrow
    column = schema.get_field_index("document")
    target.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(target, schema) as writer:
        for batch in parquet.iter_batches(batch_size=batch_rows):
            values = batch.to_pydict()
            filled = []
            for row_id, source_name, document in zip(values["id"], values["source"], values["document"]):
                summary.rows += 1
                if document is None and source_name == INSTITUTIONAL_BOOKS:
                    summary.null_documents += 1
                    document = documents.get(row_id)
                    if document is not None:
                        summary.rebuilt += 1
                    elif row_id in textless:
                        summary.no_text += 1
                    else:
                        summary.not_found += 1
                filled.append(document)
            table = pa.Table.from_batches([batch]).set_column(
                column, schema.field(column), pa.array(filled, type=schema.field(column).type))
            writer.write_table(table)


def rebuild_documents(books_dir: str | Path, data_dir: str | Path, out_dir: str | Path,
                      columns: BooksColumns = BooksColumns(), separator: str = "\n",
                      batch_rows: int = 256) -> RebuildSummary:
    """Write ``out_dir``: the LongBlocks files of ``data_dir`` with their Institutional-Books
    documents rebuilt from the books parquet files under ``books_dir`` (see the module docstring)."""
    data, books_root, out = Path(data_dir), Path(books_dir), Path(out_dir).resolve()
    for name, root in (("--data", data), ("--books", books_root)):
        if not root.is_dir():
            raise ValueError(f"{name} {root} is not a directory")
        if out == root.resolve() or root.resolve() in out.parents:
            raise ValueError(f"--out {out_dir} lies inside {name} {root}; choose a path outside it")
    refuse_existing(out_dir)
    files, books = parquet_files([str(data)]), parquet_files([str(books_root)])
    if not files:
        raise ValueError(f"--data {data} holds no parquet files")
    if not books:
        raise ValueError(f"--books {books_root} holds no parquet files")
    summary = RebuildSummary()
    needed = _needed_barcodes(files)
    with atomic_output_dir(out_dir) as tmp:
        work = _WorkFiles(tmp / ".work")
        work.root.mkdir()
        textless = _extract_books(books, needed, columns, separator, work, summary)
        for index, path in enumerate(files):
            _rewrite(path, tmp / path.relative_to(data), work.documents(index), textless, summary,
                     batch_rows)
        shutil.rmtree(work.root)
        (tmp / "rebuild_summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
        (tmp / "NOTICE.txt").write_text(NOTICE + "\n")
    return summary


def add_rebuild_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dgrpo data rebuild-documents``."""
    parser.add_argument("--books", required=True,
                        help="directory of institutional/institutional-books-1.0 parquet files")
    parser.add_argument("--data", required=True, help="directory of LongBlocks parquet files")
    parser.add_argument("--out", required=True, help="new directory (must not exist or be empty)")
    parser.add_argument("--page-separator", choices=sorted(SEPARATORS), default="newline",
                        help="what joins a book's pages (default: newline)")


def run_rebuild(args: argparse.Namespace) -> int:
    """Rebuild as configured by :func:`add_rebuild_arguments`; prints the counts and the notice."""
    print(NOTICE, file=sys.stderr)
    try:
        summary = rebuild_documents(args.books, args.data, args.out,
                                    separator=SEPARATORS[args.page_separator])
    except (OutputExistsError, ValueError) as error:
        print(f"dgrpo data rebuild-documents: error: {error}", file=sys.stderr)
        return 2
    print(f"rebuilt {summary.rebuilt:,} of {summary.null_documents:,} null documents "
          f"({summary.not_found:,} not found in the books, {summary.no_text:,} without text) "
          f"in {summary.rows:,} rows; wrote {args.out}")
    print(NOTICE, file=sys.stderr)
    return 0
