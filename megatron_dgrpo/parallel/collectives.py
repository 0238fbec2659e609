"""Every collective the package runs, in one place: thin, typed wrappers over ``torch.distributed``.

Conventions: ``group=None`` means "no parallelism of that kind" for the tensor helpers (the
call is a no-op returning the local value) and "the default group" for the object helpers
that name ranks (``world`` in their docstrings). A group of size 1 is always a no-op. Tensors
are moved to where the group's backend needs them (:func:`collective_device`: the rank's GPU
under NCCL, the CPU under gloo) and results come back as the caller's dtype/device where
noted. Callers never import ``torch.distributed`` for communication.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_dgrpo.errors import RunFailure

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
_timeout: datetime.timedelta | None = None  # of the default group, when created here


def is_initialized() -> bool:
    """True once the default process group exists."""
    return dist.is_available() and dist.is_initialized()


def world_rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Ranks in the default group (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def world_group():
    """The default group as a tensor-collective ``group`` argument (``None`` when there is
    no process group, which makes the tensor helpers no-ops)."""
    return dist.group.WORLD if is_initialized() else None


def group_rank_and_size(group) -> tuple[int, int]:
    """``(rank, world size)`` in ``group``; ``(0, 1)`` for ``group=None`` (no parallelism)."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def group_ranks(group) -> list[int]:
    """Global ranks of ``group``'s members, in group-rank order."""
    return dist.get_process_group_ranks(group)


def last_rank(group) -> int:
    """Global rank of ``group``'s last member (of a pipeline group: its last stage); this
    process's rank for ``group=None``."""
    return group_ranks(group)[-1] if group is not None else world_rank()


def _active(group) -> bool:
    return group is not None and dist.get_world_size(group) > 1


def collective_device(group=None) -> torch.device:
    """Where a tensor must live to take part in a collective of ``group`` (default: the
    world): this rank's GPU under NCCL, the CPU under gloo."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------- tensors


def all_reduce(tensor: Tensor, op: str = "sum", group=None) -> Tensor:
    """In-place all-reduce (``op``: sum, max, min) over ``group``; returns ``tensor``.
    A no-op for ``group=None`` or a group of one."""
    if _active(group):
        dist.all_reduce(tensor, op=_OPS[op], group=group)
    return tensor


def reduce_scalar(value: Tensor | float, op: str = "sum", group=None) -> float:
    """``value`` (a number or a 0-d tensor) reduced over ``group`` in float64."""
    device = collective_device(group) if _active(group) else torch.device("cpu")
    tensor = torch.as_tensor(value).detach().to(device, dtype=torch.float64, copy=True)
    return float(all_reduce(tensor, op, group))


def all_gather_tensors(tensor: Tensor, group) -> list[Tensor]:
    """Every rank's ``tensor`` (same shape on all ranks), in group-rank order; ``[tensor]``
    without parallelism. No autograd."""
    if not _active(group):
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def send_tensor(tensor: Tensor, dst: int) -> None:
    """Point-to-point send to global rank ``dst`` (blocking)."""
    dist.send(tensor.contiguous(), dst=dst)


def recv_tensor(out: Tensor, src: int) -> Tensor:
    """Receive into ``out`` from global rank ``src`` (blocking); returns ``out``."""
    dist.recv(out, src=src)
    return out


def broadcast_tensor(tensor: Tensor, src: int, group) -> Tensor:
    """In-place broadcast of ``tensor`` from global rank ``src`` over ``group``."""
    if _active(group):
        dist.broadcast(tensor, src=src, group=group)
    return tensor


# ---------------------------------------------------------------------------- objects


def all_gather_objects(value: Any, group=None) -> list[Any]:
    """Every rank's (picklable) ``value`` over ``group`` (world when ``None``), in rank order."""
    size = dist.get_world_size(group) if is_initialized() else 1
    if size == 1:
        return [value]
    parts: list[Any] = [None] * size
    dist.all_gather_object(parts, value, group=group)
    return parts


def gather_objects(value: Any, dst: int, group=None) -> list[Any] | None:
    """Every rank's ``value`` on global rank ``dst`` (``None`` elsewhere), over ``group``
    (world when ``None``)."""
    if not is_initialized() or dist.get_world_size(group) == 1:
        return [value]
    parts = [None] * dist.get_world_size(group) if dist.get_rank() == dst else None
    dist.gather_object(value, parts, dst=dst, group=group)
    return parts


def broadcast_object(value: Any, src: int, group=None) -> Any:
    """``value`` as global rank ``src`` has it, on every rank of ``group`` (world when
    ``None``); the other ranks' ``value`` is ignored."""
    if not is_initialized() or dist.get_world_size(group) == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def new_group(ranks: list[int]):
    """A process group over the global ``ranks`` (collective: every rank must call it, with
    the same arguments, in the same order relative to other group creations)."""
    return dist.new_group(ranks, timeout=_timeout)


def init_default_group(backend: str, timeout_s: float | None = None) -> None:
    """Create the default process group from the torchrun environment, if not yet there.
    ``timeout_s``: how long the start-up rendezvous and every collective (of this group and
    of those :func:`new_group` makes) wait for the other ranks before raising (torch's
    default when ``None``)."""
    global _timeout
    if not is_initialized():
        _timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, timeout=_timeout)


class PeerLostError(RunFailure):
    """A collective failed: another rank died, or stopped answering for longer than the
    timeout. The message names this rank and the backend's error."""


# gloo's transport errors (a reset connection, a timed-out receive) are plain RuntimeErrors
# whose text names the transport; NCCL's and the rendezvous store's are DistErrors.
_PEER_FAILURE_MARKERS = ("gloo/transport", "NCCL communicator")


def peer_lost_error(exc: BaseException) -> PeerLostError | None:
    """:class:`PeerLostError` describing ``exc`` if it is a collective's failure caused by
    another rank (dead, or silent past the timeout), else ``None``."""
    if isinstance(exc, PeerLostError):
        return exc
    text = str(exc)
    if not (isinstance(exc, dist.DistError) or any(m in text for m in _PEER_FAILURE_MARKERS)):
        return None
    rank = world_rank() if is_initialized() else int(os.environ.get("RANK", "0"))
    size = world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    detail = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return PeerLostError(
        f"rank {rank} of {size} lost contact with the other ranks ({type(exc).__name__}: "
        f"{detail}); one of them died or hung, its log says why. This rank stops; restarted, "
        "the run resumes from its last checkpoint")


def barrier(group=None) -> None:
    """Wait for every rank of ``group`` (world when ``None``)."""
    if is_initialized() and dist.get_world_size(group) > 1:
        dist.barrier(group=group)


def max_over_world(value: float) -> float:
    """The largest ``value`` over all ranks."""
    return max(all_gather_objects(value))


def worst_over_world(metrics: Mapping[str, float]) -> dict[str, float]:
    """Each key's largest value over the ranks' dicts (a rank may hold only some keys)."""
    merged: dict[str, float] = {}
    for part in all_gather_objects(dict(metrics)):
        for key, value in part.items():
            merged[key] = max(merged.get(key, value), value)
    return merged
