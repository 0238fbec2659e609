"""``dgrpo report RUN_DIR``: training curves as PNG and a Markdown summary of a run.

Reads ``RUN_DIR/metrics.jsonl`` and writes ``RUN_DIR/report/curves.png`` (one panel per
metric, grouped by ``/`` prefix, in key order) and ``RUN_DIR/report/summary.md`` (first,
last, min and max of every metric).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from megatron_dgrpo.train.metrics import read_metrics

_NOT_METRICS = {"step", "time"}


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


def summary_markdown(run_dir: Path, series: dict[str, tuple[list[int], list[float]]]) -> str:
    last_step = max((s[-1] for s, _ in series.values()), default=0)
    lines = [f"# Run report: {run_dir.name}", "", f"Steps logged: up to {last_step}.", "",
             "| metric | first | last | min | max |", "|---|---:|---:|---:|---:|"]
    for key, (_, values) in series.items():
        lines.append(f"| {key} | {values[0]:.4g} | {values[-1]:.4g} | "
                     f"{min(values):.4g} | {max(values):.4g} |")
    lines += ["", "![curves](curves.png)", ""]
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
    plot_curves(series, out / "curves.png")
    (out / "summary.md").write_text(summary_markdown(run_dir, series), encoding="utf-8")
    return out


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory containing metrics.jsonl")


def run_report(args: argparse.Namespace) -> int:
    out = write_report(args.run_dir)
    print(f"wrote {out / 'curves.png'} and {out / 'summary.md'}")
    return 0
