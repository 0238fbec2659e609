"""Save-on-signal: turn SIGTERM / SIGUSR1 (Slurm pre-emption, ``--signal=USR1@120``) into a
request the training loop honours at the end of the current step.

    with PreemptionGuard() as guard:
        for step in ...:
            train_step()
            if guard.should_stop():          # collective: every rank agrees
                save_checkpoint(); break

The handler only records the signal; all I/O happens in the loop, between steps, so a
requeued job loses at most the step that was running.
"""

from __future__ import annotations

import signal
from types import FrameType

from megatron_dgrpo.parallel.collectives import reduce_scalar, world_group

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionGuard:
    """Context manager that catches ``signals`` and restores the previous handlers on exit."""

    def __init__(self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS):
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def __enter__(self) -> "PreemptionGuard":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def should_stop(self) -> bool:
        """True if any rank received a signal (an all-reduce when torch.distributed is up)."""
        return reduce_scalar(float(self.received is not None), "max", world_group()) > 0
