"""``dgrpo report RUN_DIR``: training curves as PNG and a Markdown summary of a run.

Reads ``RUN_DIR/metrics.jsonl`` and writes ``RUN_DIR/report/curves.png`` (one panel per
metric, grouped by ``/`` prefix, in key order) and ``RUN_DIR/report/summary.md`` (first,
last, min and max of every metric). A run with held-out evaluations (``eval/<family>/<length>``,
:mod:`megatron_dgrpo.train.evaluation`) also gets ``RUN_DIR/report/eval.png`` (one panel per
family, a line per length, the no-context baseline ``eval_baseline/<family>`` dashed) and a
family x evaluated-step table in the summary; those scores are not repeated in ``curves.png``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from megatron_dgrpo.data.synth.length import parse_length
from megatron_dgrpo.train.metrics import read_metrics

_NOT_METRICS = {"step", "time"}
EVAL, BASELINE, ALL = "eval", "eval_baseline", "all"


def metric_series(records: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """key -> (steps, values) for every numeric metric, skipping null (non-finite) values."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        for key, value in record.items():
            if key in _NOT_METRICS or not isinstance(value, (int, float)):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(record["step"])
            values.append(float(value))
    return dict(sorted(series.items()))


def plot_curves(series: dict[str, tuple[list[int], list[float]]], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 3
    rows = max(1, math.ceil(len(series) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.8 * rows), squeeze=False)
    for ax, (key, (steps, values)) in zip(axes.flat, series.items()):
        ax.plot(steps, values, marker="." if len(steps) < 40 else None, linewidth=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def eval_series(series: dict[str, tuple[list[int], list[float]]]
                ) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """family -> length -> (steps, scores) of the held-out scores (``all`` for the pooled ones)."""
    families: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for key, values in series.items():
        if key == f"{EVAL}/{ALL}":
            families.setdefault(ALL, {})[ALL] = values
        elif key.startswith(EVAL + "/"):
            family, _, length = key[len(EVAL) + 1:].rpartition("/")
            families.setdefault(family, {})[length] = values
    return {family: dict(sorted(lengths.items(), key=lambda item: _length_order(item[0])))
            for family, lengths in sorted(families.items(),
                                          key=lambda item: _length_order(item[0]))}


def _length_order(label: str) -> tuple[bool, int, str]:
    """``all`` last, token counts (``4k``) by size, other labels by name."""
    try:
        return (label == ALL, parse_length(label), label)
    except ValueError:
        return (label == ALL, 0, label)


def _baseline(series, family: str) -> float | None:
    values = series.get(f"{BASELINE}/{family}")
    return values[1][-1] if values else None


def plot_eval(series: dict[str, tuple[list[int], list[float]]], out_png: Path) -> None:
    """One panel per family: a line per length (``all`` bold), the baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = eval_series(series)
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.2), squeeze=False)
    for ax, (family, lengths) in zip(axes[0], families.items()):
        for length, (steps, values) in lengths.items():
            ax.plot(steps, values, marker=".", linewidth=2.4 if length == ALL else 1.0,
                    label=length)
        baseline = _baseline(series, family)
        if baseline is not None:
            ax.axhline(baseline, color="grey", linestyle="--", linewidth=1, label="baseline")
        ax.set_title(f"eval: {family}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylim(-2, 102)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def eval_markdown(series: dict[str, tuple[list[int], list[float]]]) -> list[str]:
    """Held-out score per family (all lengths) at every evaluated step, and the baseline."""
    families = eval_series(series)
    steps = sorted({s for lengths in families.values() if ALL in lengths for s in lengths[ALL][0]})
    lines = ["## Held-out evaluation (score x 100, all lengths)", "",
             "| family | " + " | ".join(f"step {s}" for s in steps) + " | baseline |",
             "|---" + "|---:" * (len(steps) + 1) + "|"]
    for family, lengths in families.items():
        by_step = dict(zip(*lengths[ALL])) if ALL in lengths else {}
        baseline = _baseline(series, family)
        cells = [f"{by_step[s]:.1f}" if s in by_step else "-" for s in steps]
        cells.append("-" if baseline is None else f"{baseline:.1f}")
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return lines + ["", "![held-out evaluation](eval.png)", ""]


def summary_markdown(run_dir: Path, series: dict[str, tuple[list[int], list[float]]]) -> str:
    last_step = max((s[-1] for s, _ in series.values()), default=0)
    lines = [f"# Run report: {run_dir.name}", "", f"Steps logged: up to {last_step}.", "",
             "| metric | first | last | min | max |", "|---|---:|---:|---:|---:|"]
    for key, (_, values) in series.items():
        lines.append(f"| {key} | {values[0]:.4g} | {values[-1]:.4g} | "
                     f"{min(values):.4g} | {max(values):.4g} |")
    lines += ["", "![curves](curves.png)", ""]
    if eval_series(series):
        lines += eval_markdown(series)
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    """Render the report of ``run_dir``; returns the report directory."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl records to report")
    series = metric_series(records)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    plot_curves({k: v for k, v in series.items() if not k.startswith((EVAL + "/", BASELINE + "/"))},
                out / "curves.png")
    if eval_series(series):
        plot_eval(series, out / "eval.png")
    (out / "summary.md").write_text(summary_markdown(run_dir, series), encoding="utf-8")
    return out


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory containing metrics.jsonl")


def run_report(args: argparse.Namespace) -> int:
    out = write_report(args.run_dir)
    plots = " and ".join(str(out / name) for name in ("curves.png", "eval.png")
                         if (out / name).is_file())
    print(f"wrote {plots} and {out / 'summary.md'}")
    return 0
