"""Per-step metrics: one JSON object per line in ``RUN_DIR/metrics.jsonl``, TensorBoard, and
optionally Weights & Biases (:mod:`.wandb_logger`, same names; tables as W&B tables).

Only one rank writes (the caller decides which: usually global rank 0 after the metrics
have been reduced). Keys are flat strings, grouped by a ``/`` prefix (``reward/mean``,
``kl/teacher``, ``time/rollout_s``); TensorBoard shows each group as a section.

On resume from step ``k`` the lines of steps after ``k`` (written before the interruption,
not covered by the checkpoint) are dropped, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    from megatron_dgrpo.train.wandb_logger import WandbConfig

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a run, in order; a torn last line (crash mid-write) is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLogger:
    """Append per-step scalars to JSONL and TensorBoard.

    Args:
        run_dir: the run's directory (created if missing).
        resume_step: the step the run resumes after; later records are dropped. ``None``
            for a fresh run, which refuses to append to an existing non-empty metrics file.
        tensorboard: also write TensorBoard event files under ``RUN_DIR/tensorboard``.
        wandb: also log to this W&B project (:class:`~.wandb_logger.WandbConfig`), with
            ``run_config`` (a plain mapping) as the W&B run's config.
    """

    def __init__(self, run_dir: str | os.PathLike, resume_step: int | None = None,
                 tensorboard: bool = True, wandb: "WandbConfig | None" = None,
                 run_config: Mapping[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if resume_step is None:
            if self.path.is_file() and self.path.stat().st_size > 0:
                raise FileExistsError(f"{self.path} already has records; resume the run or "
                                      "choose a new run directory")
        else:
            kept = [r for r in read_metrics(self.run_dir) if r["step"] <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        self._wandb = None
        if wandb is not None:
            from megatron_dgrpo.train.wandb_logger import WandbLogger

            self._wandb = WandbLogger(wandb, self.run_dir, run_config)
        self._file = open(self.path, "a", encoding="utf-8")
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"),
                                         purge_step=None if resume_step is None else resume_step + 1)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Write one step's scalars (non-finite values are kept in JSON as null)."""
        record = {"step": step, "time": time.time()}
        for key, value in metrics.items():
            value = float(value)
            record[key] = value if math.isfinite(value) else None
            if self._writer is not None and math.isfinite(value):
                self._writer.add_scalar(key, value, step)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(step, metrics)

    def log_table(self, step: int, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """An evaluation table: to W&B as a table when configured (JSONL and TensorBoard keep scalars only)."""
        if self._wandb is not None:
            self._wandb.log_table(step, name, columns, rows)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
