"""``dgrpo`` commands as real processes that start in a fraction of a second: forked from a
server that has already imported the heavy dependencies (torch, Megatron, transformers), so a
test that kills and restarts a run twenty times does not pay the ~7 s import twenty times.

    launcher = CliLauncher()                       # starts the fork server, waits for its imports
    proc = launcher.start(["train", "--config", "run.yaml"], log="run.log")
    proc.kill()                                    # SIGKILL: a real process dies
    proc.join(60); proc.exitcode                   # -9 when killed, else dgrpo's exit code

Each process runs :func:`megatron_dgrpo.cli.main` on its arguments and exits with its return
code, as the ``dgrpo`` console script does (an uncaught exception prints its traceback and
exits 1, as ``python`` does, after the ``atexit`` handlers); stdout and stderr go to ``log``.
Each leads its own process group, so :func:`kill_group` ends it with its children. ``env``
is added to the environment before anything runs (the torchrun variables of a rank, for
multi-rank runs launched rank by rank as ``srun`` does). ``file_size_limit`` sets
``RLIMIT_FSIZE`` (bytes): a write past it fails with ``EFBIG`` (Python ignores ``SIGXFSZ``),
which is how tests make a disk "full" without root. Every process runs torch on one thread,
so runs compared with each other do the same floating-point reductions.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence

# What a ``dgrpo train`` imports, loaded once in the fork server.
PRELOAD = ["torch", "megatron.core", "transformers", "torch.utils.tensorboard",
           "megatron_dgrpo.cli", "megatron_dgrpo.train.runner", "megatron_dgrpo.train.loop"]


def _run_cli(argv: Sequence[str], env: Mapping[str, str], log: str,
             file_size_limit: int | None, setup: Callable[[], None] | None) -> None:
    import torch

    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    os.environ.update(env)
    torch.set_num_threads(1)
    if file_size_limit is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    os.setpgrp()  # what it starts (vLLM engine cores) can be ended with it: kill_group
    if setup is not None:
        setup()
    from megatron_dgrpo.cli import main

    try:
        code = main(list(argv))
    finally:
        atexit._run_exitfuncs()  # as a python process does at its end (multiprocessing skips)
    sys.exit(code)


class CliLauncher:
    """Starts ``dgrpo`` processes forked from a pre-imported server (see the module docstring)."""

    def __init__(self, log: str | os.PathLike = os.devnull) -> None:
        """Start the server and wait until it has imported :data:`PRELOAD` (``warmup_s``
        seconds: about what a ``dgrpo`` process started from scratch spends importing)."""
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(PRELOAD)
        started = time.monotonic()
        probe = self.start(["--version"], log)
        probe.join()
        self.warmup_s = time.monotonic() - started

    def start(self, argv: Sequence[str], log: str | os.PathLike,
              env: Mapping[str, str] | None = None, file_size_limit: int | None = None,
              setup: Callable[[], None] | None = None) -> multiprocessing.Process:
        """A started process running ``dgrpo ARGV`` (after ``setup()``, a module-level
        function, e.g. one registering a test's reward function)."""
        process = self._context.Process(
            target=_run_cli,
            args=(list(argv), dict(env or {}), str(log), file_size_limit, setup))
        process.start()
        return process


def kill_group(process: multiprocessing.Process) -> None:
    """SIGKILL ``process`` and whatever it started (its process group)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
