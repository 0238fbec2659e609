"""How ranks come to be: torchrun's environment, a world of one, or N local spawned ranks.

``torchrun`` (and ``srun`` wrappers that export the same variables) set RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT and LOCAL_RANK. A command started without them runs as a single
process (:func:`ensure_process_group_env` fills in a one-rank group on 127.0.0.1).

:func:`run_distributed` starts N real processes joined in a gloo (or NCCL) group on this
machine and returns each rank's result: shipped commands (``dgrpo quickstart``) use it to
run phases on several local ranks, and tests use it to check TP/PP/CP/DP behaviour with
real ranks::

    def body(rank, world_size, x):
        ...                     # torch.distributed is initialised here
        return some_picklable_value

    results = run_distributed(body, world_size=2, args=(x,))   # [value_rank0, value_rank1]

``fn`` must be importable by a fresh interpreter (a module-level function), because the
workers are started with the ``spawn`` method. Each worker gets ``MASTER_ADDR``,
``MASTER_PORT``, ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set as torchrun would, and an
initialised default process group; it is destroyed when ``fn`` returns. The rendezvous
store is opened by the caller before the workers start and held until they finish, so no
other process can take its port in between. A failure on any rank is re-raised in the
caller with that rank's traceback. Each worker leads its own process group, and whatever it
started that is still alive when the run ends (e.g. a vLLM engine-core process) is killed
with it.
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import socket
import time
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_process_group_env() -> int:
    """Make ``torch.distributed`` initialisable from the environment; returns the world size."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE is set but {', '.join(missing)} are not: launch with "
                         "torchrun, or unset WORLD_SIZE to run as a single process")
    return int(os.environ["WORLD_SIZE"])


class DistributedWorkerError(RuntimeError):
    """A rank raised; the message carries that rank's traceback."""


def _worker(rank: int, world_size: int, port: int, backend: str, fn: Callable,
            args: Sequence[Any], results: "mp.Queue") -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    os.setpgrp()  # its children join this group, so the caller can end them all
    torch.set_num_threads(1)
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        # Plain pickle, by value: torch's queue pickler would pass tensors through shared
        # memory that disappears when this process exits.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # report everything, including assertion failures
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


_POLL_S = 2.0  # seconds between checks for ranks that died without reporting


def _raise_if_dead_or_late(procs: list, collected: dict[int, Any], deadline: float,
                           timeout_s: float) -> None:
    """DistributedWorkerError if a rank that has not reported exited abnormally (a crash,
    a signal, or a spawn bootstrap error such as a script without a ``__main__`` guard), or
    if the run is past its deadline."""
    dead = {r: p.exitcode for r, p in enumerate(procs)
            if r not in collected and p.exitcode not in (None, 0)}
    if dead:
        codes = ", ".join(f"rank {r}: exit code {code}" for r, code in dead.items())
        raise DistributedWorkerError(
            f"ranks exited without reporting a result ({codes}); a spawned rank re-imports "
            "the calling script, which must start its work under "
            "`if __name__ == '__main__':`")
    if time.monotonic() > deadline:
        raise DistributedWorkerError(f"no result from some ranks within {timeout_s:.0f}s")


def run_distributed(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (),
                    backend: str = "gloo", timeout_s: float = 600.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes.

    Returns the per-rank return values, indexed by rank. Raises
    :class:`DistributedWorkerError` if any rank raised, or if a rank died or the run
    took longer than ``timeout_s`` seconds.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True,
                          wait_for_workers=False)
    port = store.port
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, fn, args, results))
             for r in range(world_size)]
    for proc in procs:
        proc.start()
    collected: dict[int, Any] = {}
    failures: list[str] = []
    finished = False
    deadline = time.monotonic() + timeout_s
    try:
        while len(collected) + len(failures) < world_size:
            try:
                rank, ok, value = results.get(timeout=_POLL_S)
            except queue.Empty:
                _raise_if_dead_or_late(procs, collected, deadline, timeout_s)
                continue
            if ok:
                collected[rank] = pickle.loads(value)  # our own child's bytes, not a file
            else:
                failures.append(f"--- rank {rank} ---\n{value}")
                break  # other ranks are likely blocked in a collective
        finished = True
    finally:
        for proc in procs:
            proc.join(timeout=60 if finished and not failures else 5)
            if proc.is_alive():
                proc.kill()
                proc.join()
            try:  # leftovers of the rank's process group (reparented children)
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    if failures:
        raise DistributedWorkerError("a rank failed:\n" + "\n".join(failures))
    return [collected[r] for r in range(world_size)]
