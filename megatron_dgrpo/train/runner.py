"""Running a training job: resume, steps with progress, metrics, checkpoints, pre-emption.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl``,
``tensorboard/``, ``checkpoints/`` and, with an ``eval`` section, ``eval/`` (one report per
evaluation, :mod:`megatron_dgrpo.train.evaluation`). Starting a run whose directory has a
checkpoint resumes it from the newest complete one (a directory of another run, or of anything
else, is refused: :mod:`.run_dir`); SIGTERM/SIGUSR1 save after the current step and exit with
:data:`REQUEUE_EXIT_CODE`, so a Slurm requeue loses at most that step; a ``kill -9`` loses
the steps since the last checkpoint. A step skipped for a non-finite loss saves nothing
(:mod:`.guards`). A collective that fails because another rank died or hung becomes
:class:`~megatron_dgrpo.parallel.collectives.PeerLostError`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from megatron_dgrpo.config import to_dict
from megatron_dgrpo.parallel.collectives import init_default_group, peer_lost_error, world_rank
from megatron_dgrpo.parallel.cpu import default_backend
from megatron_dgrpo.train.checkpoint import (
    latest_checkpoint, load_training_checkpoint, remove_interrupted_saves,
    save_training_checkpoint)
from megatron_dgrpo.train.config import RunConfig
from megatron_dgrpo.train.evaluation import InTrainingEvaluation
from megatron_dgrpo.train.loop import Trainer
from megatron_dgrpo.train.metrics import MetricsLogger
from megatron_dgrpo.train.preemption import PreemptionGuard
from megatron_dgrpo.train.run_dir import check_run_dir, write_run_config

REQUEUE_EXIT_CODE = 3  # "saved on a signal, run me again"
log = logging.getLogger(__name__)


def _save(trainer: Trainer) -> None:
    config = trainer.config
    save_training_checkpoint(config.run_dir, trainer.step, trainer.student, trainer.model_config,
                             trainer.optimizer, trainer.state_dict(),
                             keep_last=config.keep_last)


def _resume(trainer: Trainer) -> int | None:
    """Restore the newest checkpoint of the run, if any; returns its step."""
    run_dir = trainer.config.run_dir
    if world_rank() == 0:
        for leftover in remove_interrupted_saves(run_dir):
            log.warning("removed %s, left by a save that was interrupted", leftover)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        return None
    restored = load_training_checkpoint(checkpoint, trainer.student, trainer.optimizer)
    trainer.step = restored["step"]
    trainer.load_state_dict(restored["state"])
    if world_rank() == 0:
        log.warning("resuming %s from %s (step %d)", run_dir, checkpoint, trainer.step)
    return trainer.step


def run_training(config: RunConfig, show_progress: bool = True) -> int:
    """Train to ``config.steps`` (or until a pre-emption signal). Call on every rank.

    Returns 0 when done, :data:`REQUEUE_EXIT_CODE` after a save-on-signal.
    """
    check_run_dir(config)  # before any work: another run's directory is refused
    try:
        return _train(config, show_progress)
    except Exception as exc:
        lost = peer_lost_error(exc)
        if lost is None or lost is exc:
            raise
        raise lost from exc


def _train(config: RunConfig, show_progress: bool) -> int:
    # before world_rank() (0 on every rank without it); the timeout bounds a lost peer
    init_default_group(default_backend(), config.parallel.timeout_s)
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
        write_run_config(config)
    # steps logged after the checkpoint resumed from (none: every step) are dropped
    logger = MetricsLogger(run_dir, resume_step=resumed_from or 0, wandb=config.logging.wandb,
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
                trainer.skipped.record(trainer.step, metrics)  # stops a diverged run
                due = trainer.step % config.save_every == 0 or trainer.step == config.steps
                if stop or (due and not metrics["optim/skipped"]):
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
