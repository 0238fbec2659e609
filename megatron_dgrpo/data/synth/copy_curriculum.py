"""The copy curriculum: documents that teach a small model to look things up.

Each document is a comma-separated list of fresh made-up person names, then ``Recap:`` and the
same list again, so every token of the second half can be copied from the first and none can be
predicted from priors. Language modelling on these documents (``prompt_loss: true``) is how the
quickstart's shipped models learned induction (copying what follows an earlier match) before
they saw a task: ``tools/make_quickstart_models.py`` trains on them first.

A row has the LongBlocks public columns (``id``, ``document``, ``source``, ``language``,
``question``, ``answer``); only ``document`` carries signal, ``question`` and ``answer`` are
fixed placeholders.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ...outputs import atomic_output_dir
from .words import NameFactory

COPY_SOURCE = "copy"


def copy_document(names: list[str]) -> str:
    """``"A, B, C.\\n\\nRecap: A, B, C."`` for ``names`` ``[A, B, C]``."""
    listed = ", ".join(names)
    return f"{listed}.\n\nRecap: {listed}."


def copy_rows(num_documents: int, seed: int, names_per_document: int) -> list[dict[str, str]]:
    """``num_documents`` rows, each of ``names_per_document`` names unique within the document
    (a fresh :class:`NameFactory` per document, all from one ``random.Random(seed)``)."""
    if num_documents < 1 or names_per_document < 1:
        raise ValueError(f"copy-curriculum data needs at least one document of at least one "
                         f"name, got {num_documents} documents of {names_per_document} names")
    rng = random.Random(seed)
    rows = []
    for index in range(num_documents):
        factory = NameFactory(rng)
        names = [factory.person() for _ in range(names_per_document)]
        rows.append({"id": f"copy-{seed}-{index}", "document": copy_document(names),
                     "source": COPY_SOURCE, "language": "en", "question": "Recap?",
                     "answer": "."})
    return rows


def write_copy_dataset(out_dir: str | Path, num_documents: int, seed: int,
                        names_per_document: int) -> Path:
    """Write :func:`copy_rows` as ``out_dir/part-00000.parquet`` (atomically; an existing
    non-empty ``out_dir`` is refused). Returns ``out_dir``."""
    table = pa.Table.from_pylist(copy_rows(num_documents, seed, names_per_document))
    with atomic_output_dir(out_dir) as tmp:
        pq.write_table(table, Path(tmp) / "part-00000.parquet")
    return Path(out_dir)
