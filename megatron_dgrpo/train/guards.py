"""What a training step does when part of it goes wrong, instead of training on garbage or
dying on the first hiccup:

* :class:`SkippedSteps`: a step whose loss or gradient norm is not finite updates nothing
  (the optimizer skips it, :class:`~megatron_dgrpo.train.update.StudentOptimizer`); it is
  logged with the offending values, and ``max_skipped_steps`` skips in a row stop the run
  (:class:`DivergedError`).
* :func:`invalid_rewards`: a sample whose reward function raised or returned a non-finite
  value gets zero weight (its loss tokens leave the loss) and is counted, not the run.
* :func:`generate_with_retries`: a rollout engine that fails, or returns fewer samples
  than asked (:class:`~megatron_dgrpo.train.sources.RolloutError`), is retried
  ``rollout.retries`` times with a warning, then stops the run with the engine's error.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from megatron_dgrpo.errors import RunFailure
from megatron_dgrpo.parallel.collectives import all_gather_objects, reduce_scalar, world_group
from megatron_dgrpo.train.sources import RolloutError

log = logging.getLogger(__name__)


class DivergedError(RunFailure):
    """Too many steps in a row had a non-finite loss or gradient norm."""


class SkippedSteps:
    """Counts consecutive skipped steps (call :meth:`record` after every step)."""

    def __init__(self, max_in_a_row: int, in_a_row: int = 0):
        self.max_in_a_row, self.in_a_row = max_in_a_row, in_a_row

    def record(self, step: int, metrics: dict[str, float]) -> None:
        """Note whether ``step`` was skipped (``metrics["optim/skipped"] > 0``); log a skip
        with its non-finite metrics; raise :class:`DivergedError` at the limit."""
        if not metrics.get("optim/skipped"):
            self.in_a_row = 0
            return
        self.in_a_row += 1
        offending = ", ".join(f"{key}={value}" for key, value in sorted(metrics.items())
                              if not math.isfinite(value)) or "none"
        log.warning("step %d skipped: non-finite %s; weights and optimizer state unchanged, no "
                    "checkpoint written (%d in a row, the run stops at max_skipped_steps=%d)",
                    step, offending, self.in_a_row, self.max_in_a_row)
        if self.in_a_row >= self.max_in_a_row:
            raise DivergedError(
                f"step {step}: {self.in_a_row} steps in a row had a non-finite loss or gradient "
                f"norm ({offending}), the limit max_skipped_steps={self.max_in_a_row}; the run "
                "stops. The last checkpoint holds the weights before them: lower optim.lr, "
                "check the data of these steps, or raise max_skipped_steps")


def invalid_rewards(rewards: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """``rewards`` ``[B]`` (rows grouped by prompt, ``group_size`` each; NaN or inf where the
    reward failed) -> (rewards with each failed one replaced by the mean of its group's valid
    ones (0 if none): the group mean stays that of the valid ones, and so do their
    advantages unless divided by the group std, which the extra at-the-mean value shrinks by
    ``sqrt((k - 1) / k)`` for ``k`` valid of the group's values; the ``[B]`` bool mask of the
    failed rows, which the step drops from the loss)."""
    invalid = ~torch.isfinite(rewards)
    groups = rewards.reshape(-1, group_size)
    valid = ~invalid.reshape(-1, group_size)
    count = valid.sum(dim=1, keepdim=True)
    mean = torch.where(valid, groups, 0).sum(dim=1, keepdim=True) / count.clamp(min=1)
    fixed = torch.where(valid, groups, mean.expand_as(groups)).reshape(-1)
    return fixed, invalid


def generate_with_retries(source, examples: list, step: int, draw: int, retries: int):
    """``source.generate(examples, step, draw)``, attempted up to ``1 + retries`` times; every
    rank attempts again when any rank's attempt raised :class:`RolloutError` (so collectives
    stay in step). Raises :class:`RolloutError` naming every attempt's error when all fail."""
    errors: list[str] = []
    for attempt in range(1 + retries):
        try:
            result, error = source.generate(examples, step, draw), None
        except RolloutError as exc:
            result, error = None, str(exc)
        if reduce_scalar(float(error is not None), "max", world_group()) == 0:
            return result
        failed = "; ".join(e for e in all_gather_objects(error) if e)
        errors.append(failed)
        if attempt < retries:
            log.warning("step %d: rollout attempt %d of %d failed (%s); retrying", step,
                        attempt + 1, 1 + retries, failed)
    raise RolloutError(f"step {step}: rollouts failed {1 + retries} times "
                       f"(rollout.retries={retries}): {' | '.join(errors)}")
