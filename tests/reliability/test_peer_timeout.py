"""A peer that stops answering (alive, silent) inside one of Megatron's process groups: the
waiting rank's collective fails after ``parallel.timeout_s``, as a :class:`PeerLostError`,
not after Megatron's default 30 minutes nor a rounded-up minute. (A peer that dies is
noticed at once, by its closed connection; a silent one only by the timeout.)
"""

from __future__ import annotations

import time

import pytest

from megatron_dgrpo.parallel.launch import run_distributed

pytestmark = [pytest.mark.reliability, pytest.mark.multiproc]

TIMEOUT_S = 3.0


def _wait_on_a_silent_peer(rank, world_size, released):
    """Rank 0 all-reduces over the TP group while rank 1 waits for ``released`` (written by
    rank 0 once its collective has failed). Rank 0 returns (seconds waited, PeerLostError
    message or None)."""
    from pathlib import Path

    import torch
    from megatron.core import parallel_state as ps

    from megatron_dgrpo.models.config import ParallelConfig
    from megatron_dgrpo.models.provider import initialize_parallel
    from megatron_dgrpo.parallel.collectives import peer_lost_error

    initialize_parallel(ParallelConfig(tensor_parallel=2, timeout_s=TIMEOUT_S), seed=1)
    if rank == 1:
        deadline = time.monotonic() + 120
        while not Path(released).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return None
    started = time.monotonic()
    try:
        torch.distributed.all_reduce(torch.ones(4), group=ps.get_tensor_model_parallel_group())
        lost = None
    except Exception as exc:  # noqa: BLE001 - what the run's handler would see
        lost = peer_lost_error(exc)
        lost = str(lost) if lost is not None else f"not a lost peer: {exc!r}"
    waited = time.monotonic() - started
    Path(released).write_text("done")
    return waited, lost


@pytest.mark.reliability_case("fault")
def test_a_silent_peer_in_a_megatron_group_fails_after_parallel_timeout_s(tmp_path):
    (waited, lost), _ = run_distributed(_wait_on_a_silent_peer, 2,
                                        args=(str(tmp_path / "released"),), timeout_s=180)
    assert lost is not None and "lost contact with the other ranks" in lost, lost
    # the timeout, give or take start-up jitter; before the fix, 60 s (a rounded-up minute)
    assert TIMEOUT_S - 0.5 < waited < TIMEOUT_S + 15, waited
