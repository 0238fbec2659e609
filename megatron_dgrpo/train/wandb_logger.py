"""Optional Weights & Biases logging: the run config's ``logging.wandb`` section.

    logging:
      wandb: {project: my-project, entity: my-team, mode: offline}

:class:`~.metrics.MetricsLogger` fans every step's scalars out to W&B under the same names as in
``metrics.jsonl`` and TensorBoard, and evaluation tables as W&B tables. ``mode``: ``online``
(needs the network and a login), ``offline`` (writes ``RUN_DIR/wandb/offline-run-*``, upload later
with ``wandb sync``), ``disabled``. The W&B run id is kept in ``RUN_DIR/wandb_run_id``, so a
resumed run continues the same W&B run. Needs the ``wandb`` package (the ``wandb`` extra:
``pip install 'megatron-dgrpo[wandb]'``); without it, start-up fails saying so.
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

RUN_ID_FILE = "wandb_run_id"


@dataclass
class WandbConfig:
    """Where the run goes in W&B."""

    project: str = ""
    entity: str | None = None
    mode: Literal["online", "offline", "disabled"] = "online"

    def validate(self) -> None:
        if not self.project.strip():
            raise ValueError("logging.wandb.project must name a W&B project")


@dataclass
class LoggingConfig:
    """Extra metric sinks beside ``metrics.jsonl`` and TensorBoard (``wandb``: None = off)."""

    wandb: WandbConfig | None = None


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise ImportError("logging.wandb needs the wandb package: pip install 'megatron-dgrpo[wandb]' "
                          "(or pip install wandb), or remove the logging.wandb section") from None
    return wandb


class WandbLogger:
    """One W&B run for one training run directory (see the module docstring)."""

    def __init__(self, config: WandbConfig, run_dir: str | os.PathLike,
                 run_config: Mapping[str, Any] | None = None) -> None:
        config.validate()
        self._wandb = _import_wandb()
        run_dir = Path(run_dir)
        id_file = run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        self.run = self._wandb.init(project=config.project, entity=config.entity, mode=config.mode,
                                    dir=str(run_dir), id=run_id, resume="allow", name=run_dir.name,
                                    config=dict(run_config or {}))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Scalars of one step (non-finite values are left out, as in TensorBoard)."""
        values = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        self.run.log(values, step=step)

    def log_table(self, step: int, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """A table (e.g. an evaluation's cells) as a W&B table named ``name``."""
        self.run.log({name: self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])}, step=step)

    def close(self) -> None:
        """Finish the run and stop W&B's background service, which flushes the run's files."""
        self.run.finish()
        self._wandb.teardown()


__all__ = ["LoggingConfig", "WandbConfig", "WandbLogger"]
