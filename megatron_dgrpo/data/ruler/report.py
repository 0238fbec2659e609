"""RULER's table: task x context length with averages over tasks, and the paper's one-row shape.

``ruler.md`` holds the task x length table (string-match recall x 100, ``average`` = mean over
tasks per length, last column = mean over lengths) and the row a paper prints per model (the
per-length averages and their mean); ``ruler.json`` holds the same numbers.
"""

from __future__ import annotations

from ..evaluate import EvalTable
from ..suite_tables import macro_markdown, macro_summary, paper_row
from .suite import TASK_NAMES


def ruler_files(table: EvalTable, label: str = "model") -> dict[str, str]:
    """``{"ruler.md": ..., "ruler.json": ...}`` for a table whose families are RULER task names."""
    summary = macro_summary(table, TASK_NAMES)
    markdown = (macro_markdown(summary, "RULER: score by task and context length (string-match recall x 100)")
                + "\n### RULER by context length (the paper's row)\n\n" + paper_row(summary, label))
    return {"ruler.md": markdown, "ruler.json": summary.to_json()}
