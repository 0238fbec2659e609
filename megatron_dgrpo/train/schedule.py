"""The learning rate of each step: linear warm-up, then constant, cosine or linear decay.

A pure function of the step, so a resumed run continues the schedule exactly without
storing any scheduler state. Step ``k`` (1-based) uses:

* ``lr * k / warmup_steps`` for ``k <= warmup_steps``;
* then, over ``decay_steps`` more steps, from ``lr`` down to ``min_lr`` (``constant``:
  ``lr`` throughout), and ``min_lr`` after that.
"""

from __future__ import annotations

import math

DECAY_STYLES = ("constant", "cosine", "linear")


def learning_rate(step: int, lr: float, warmup_steps: int = 0, decay: str = "constant",
                  decay_steps: int = 0, min_lr: float = 0.0) -> float:
    """The learning rate of 1-based ``step``; see the module docstring."""
    if decay not in DECAY_STYLES:
        raise ValueError(f"unknown decay {decay!r}; choose one of {DECAY_STYLES}")
    if step <= warmup_steps:
        return lr * step / warmup_steps
    if decay == "constant" or decay_steps <= 0:
        return lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
    return min_lr + (lr - min_lr) * shape
