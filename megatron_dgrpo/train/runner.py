"""Running a training job: resume, steps with progress, metrics, checkpoints, pre-emption.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl``,
``tensorboard/``, ``checkpoints/`` and, with an ``eval`` section, ``eval/`` (one report per
evaluation, :mod:`megatron_dgrpo.train.evaluation`). Starting a run whose directory has a
checkpoint resumes it from the newest complete one; SIGTERM/SIGUSR1 save after the current step
and exit with :data:`REQUEUE_EXIT_CODE`, so a Slurm requeue loses at most that step.
"""

from __future__ import annotations

import logging
from pathlib import Path

from megatron_dgrpo.config import dump_yaml, to_dict
from megatron_dgrpo.parallel.collectives import init_default_group, world_rank
from megatron_dgrpo.parallel.cpu import default_backend
from megatron_dgrpo.train.checkpoint import (
    latest_checkpoint, load_training_checkpoint, save_training_checkpoint)
from megatron_dgrpo.train.config import RunConfig
from megatron_dgrpo.train.evaluation import InTrainingEvaluation
from megatron_dgrpo.train.loop import Trainer
from megatron_dgrpo.train.metrics import MetricsLogger
from megatron_dgrpo.train.preemption import PreemptionGuard

REQUEUE_EXIT_CODE = 3  # "saved on a signal, run me again"
log = logging.getLogger(__name__)


def _save(trainer: Trainer) -> None:
    config = trainer.config
    save_training_checkpoint(config.run_dir, trainer.step, trainer.student, trainer.model_config,
                             trainer.optimizer, {"prompts": trainer.prompts.state_dict()},
                             keep_last=config.keep_last)


def _resume(trainer: Trainer) -> int | None:
    """Restore the newest checkpoint of the run, if any; returns its step."""
    checkpoint = latest_checkpoint(trainer.config.run_dir)
    if checkpoint is None:
        return None
    restored = load_training_checkpoint(checkpoint, trainer.student, trainer.optimizer)
    trainer.step = restored["step"]
    trainer.prompts.load_state_dict(restored["state"]["prompts"])
    return trainer.step


def run_training(config: RunConfig, show_progress: bool = True) -> int:
    """Train to ``config.steps`` (or until a pre-emption signal). Call on every rank.

    Returns 0 when done, :data:`REQUEUE_EXIT_CODE` after a save-on-signal.
    """
    init_default_group(default_backend())  # before world_rank(): 0 on every rank without it
    writer = world_rank() == 0
    if writer:
        for note in config.notices():
            log.warning("%s", note)
        plan = config.memory_plan()
        if plan is not None:
            log.info("memory per GPU (train/memory.py):\n%s", plan.summary())
    evaluation = InTrainingEvaluation.prepare(config)  # held-out set checked before any model
    trainer = Trainer(config)
    resumed_from = _resume(trainer)
    run_dir = Path(config.run_dir)
    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(config))
    logger = MetricsLogger(run_dir, resume_step=resumed_from, wandb=config.logging.wandb,
                           run_config=to_dict(config)) if writer else None
    progress = _progress(show_progress and writer, trainer.step, config.steps)
    try:
        if evaluation is not None:
            evaluation.start(trainer, logger)  # with eval.at_start on a fresh run: step 0
        with PreemptionGuard() as guard:
            while trainer.step < config.steps:
                metrics = trainer.train_step()
                stop = guard.should_stop()
                if evaluation is not None:
                    metrics.update(evaluation.after_step(trainer, logger, stopping=stop))
                if logger is not None:
                    logger.log(trainer.step, metrics)
                if progress is not None:
                    progress.update(metrics)
                if stop or trainer.step % config.save_every == 0 or trainer.step == config.steps:
                    _save(trainer)
                if stop:
                    return REQUEUE_EXIT_CODE
        return 0
    finally:
        if progress is not None:
            progress.close()
        if logger is not None:
            logger.close()


class _Progress:
    """A rich progress bar showing the step and the headline metrics."""

    HEADLINE = ("loss", "reward/mean", "policy/kl_teacher", "policy/entropy", "eval/all")

    def __init__(self, first_step: int, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                             TimeRemainingColumn(), TextColumn("{task.fields[headline]}"))
        self._task = self._bar.add_task("train", total=total, completed=first_step, headline="")
        self._bar.start()

    def update(self, metrics: dict[str, float]) -> None:
        headline = "  ".join(f"{k}={metrics[k]:.4g}" for k in self.HEADLINE if k in metrics)
        self._bar.update(self._task, advance=1, headline=headline)

    def close(self) -> None:
        self._bar.stop()


def _progress(enabled: bool, first_step: int, total: int) -> _Progress | None:
    return _Progress(first_step, total) if enabled else None
