"""Failures of a run that are not bad input: the run cannot go on, for a reason the message
states (a rank was lost, the disk refused a checkpoint, the loss diverged, the rollout engine
failed). ``dgrpo`` prints them as one line and exits 1; bad input (``ValueError``) exits 2."""

from __future__ import annotations


class RunFailure(RuntimeError):
    """A run stopped by a fault; the message names the fault and what was kept."""
