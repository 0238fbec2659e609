"""Benchmark-style tables from an :class:`~.evaluate.EvalTable`: rows (tasks) x length columns with
*macro* averages, the way RULER and LongBench report them (every task weighs the same, whatever its
number of items; :class:`~.evaluate.EvalTable`'s own ``all`` pools items instead).

:func:`macro_summary` computes the numbers, :func:`macro_markdown` renders them: one row per task
(score per length and the task's mean over lengths), optional group rows (mean over the group's
tasks), and an ``average`` row (per length: mean over tasks; last column: mean of those).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .evaluate import EvalTable


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass(frozen=True)
class MacroSummary:
    """Scores x 100. ``rows[task][length]``; ``row_mean[task]`` over its lengths; ``groups[name][length]``
    and ``group_mean[name]``; ``average[length]`` over tasks; ``overall`` = mean of ``average``."""

    lengths: list[str]
    rows: dict[str, dict[str, float]]
    row_mean: dict[str, float]
    groups: dict[str, dict[str, float]]
    group_mean: dict[str, float]
    average: dict[str, float]
    overall: float | None

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2)


def macro_summary(table: EvalTable, order: tuple[str, ...] = (),
                  groups: dict[str, tuple[str, ...]] | None = None,
                  only: tuple[str, ...] | None = None) -> MacroSummary:
    """Macro averages of ``table``'s families (those in ``only`` if given); ``order`` lists known
    rows first (others follow sorted)."""
    families = [f for f in table.families if only is None or f in only]
    tasks = [t for t in order if t in families] + [t for t in families if t not in order]
    rows = {t: {n: v for n in table.lengths if (v := table.score(t, n)) is not None} for t in tasks}

    def columns(members: list[str]) -> dict[str, float]:
        out = {}
        for length in table.lengths:
            value = _mean([rows[t][length] for t in members if length in rows[t]])
            if value is not None:
                out[length] = value
        return out

    group_rows = {}
    for name, members in (groups or {}).items():
        present = [t for t in members if t in rows]
        if present:
            group_rows[name] = columns(present)
    average = columns(tasks)
    return MacroSummary(
        lengths=list(table.lengths),
        rows=rows,
        row_mean={t: _mean(list(v.values())) for t, v in rows.items()},
        groups=group_rows,
        group_mean={g: _mean(list(v.values())) for g, v in group_rows.items()},
        average=average,
        overall=_mean(list(average.values())),
    )


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def macro_markdown(summary: MacroSummary, title: str, row_title: str = "task",
                   single_length: bool = False) -> str:
    """The summary as a Markdown table (see the module docstring); ``single_length`` drops the
    per-length columns when there is one length (LongBench without length buckets)."""
    lengths = [] if single_length and len(summary.lengths) == 1 else summary.lengths
    header = [row_title, *lengths, "avg"]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]

    def line(name: str, values: dict[str, float], mean: float | None) -> str:
        return "| " + " | ".join([name, *(_cell(values.get(n)) for n in lengths), _cell(mean)]) + " |"

    lines += [line(t, summary.rows[t], summary.row_mean[t]) for t in summary.rows]
    lines += [line(f"*{g}*", summary.groups[g], summary.group_mean[g]) for g in summary.groups]
    lines.append(line("**average**", summary.average, summary.overall))
    return "\n".join(lines) + "\n"


def paper_row(summary: MacroSummary, label: str) -> str:
    """One model row ``| label | <average per length> | <overall> |`` with its header, the shape
    of a paper's table that compares models by context length."""
    header = ["model", *summary.average, "avg"]
    values = [label, *(_cell(v) for v in summary.average.values()), _cell(summary.overall)]
    return ("| " + " | ".join(header) + " |\n" + "|---" + "|---:" * (len(header) - 1) + "|\n"
            + "| " + " | ".join(values) + " |\n")


__all__ = ["MacroSummary", "macro_markdown", "macro_summary", "paper_row"]
