"""How a ``dgrpo`` command finds its process group: torchrun's environment, or a world of one.

``torchrun`` (and ``srun`` wrappers that export the same variables) set RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT and LOCAL_RANK. A command started without them runs as a single
process: this fills in those variables for a one-rank group on 127.0.0.1.
"""

from __future__ import annotations

import os
import socket

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
