"""All-or-nothing output directories, for every command that writes one.

Work is written into a hidden temporary sibling (``.NAME.partial-XXXX``) and renamed into
place at the end, so an output directory is either complete or absent, and nothing a user
already has is ever overwritten: an existing non-empty directory is refused before any
work starts (an existing *empty* directory is accepted and replaced).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


class OutputExistsError(FileExistsError):
    """The output path exists and is not an empty directory."""


def _occupied(out: Path) -> bool:
    return out.exists() and (not out.is_dir() or any(out.iterdir()))


def refuse_existing(out_dir: str | os.PathLike) -> None:
    """OutputExistsError if ``out_dir`` exists and is not empty (call before any work)."""
    if _occupied(Path(out_dir)):
        raise OutputExistsError(f"output directory {out_dir} already exists and is not empty; "
                                "choose a new path")


def reserve_output_dir(out_dir: str | os.PathLike) -> Path:
    """Refuse an occupied ``out_dir``, then create an empty temporary directory beside it."""
    refuse_existing(out_dir)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def commit_output_dir(tmp: Path, out_dir: str | os.PathLike) -> None:
    """Move a finished temporary directory into place (the only step that creates out_dir)."""
    out = Path(out_dir)
    if _occupied(out):
        raise OutputExistsError(f"output directory {out_dir} appeared while writing")
    if out.exists():
        out.rmdir()
    os.rename(tmp, out)


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out_dir`` only if the block succeeds."""
    tmp = reserve_output_dir(out_dir)
    try:
        yield tmp
        commit_output_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_dir_from_all_ranks(out_dir: str | os.PathLike,
                             write_rank_files: Callable[[Path], None],
                             finalize: Callable[[Path], None]) -> Path:
    """Collective all-or-nothing write of a directory that every rank contributes files to.

    Rank 0 reserves a temporary directory; every rank calls ``write_rank_files(tmp)``; if no
    rank failed, rank 0 calls ``finalize(tmp)`` (metadata written last) and renames ``tmp``
    to ``out_dir``. Any failure, on any rank, raises ``OSError`` on every rank naming the
    ranks and leaves nothing behind. Call on every rank of the default process group.
    """
    from megatron_dgrpo.parallel.collectives import (
        all_gather_objects,
        broadcast_object,
        world_rank,
    )

    rank = world_rank()
    reserved: tuple[str | None, str | None] = (None, None)
    if rank == 0:
        try:
            reserved = (str(reserve_output_dir(out_dir)), None)
        except OSError as exc:
            reserved = (None, str(exc))
    tmp_name, error = broadcast_object(reserved, src=0)
    if error:
        raise OutputExistsError(error)
    tmp = Path(tmp_name)
    failure = None
    try:
        try:
            write_rank_files(tmp)
        except Exception as exc:  # reported on every rank below
            error = f"rank {rank}: {exc}"
        errors = all_gather_objects(error)
        failure = "; ".join(e for e in errors if e)
        if rank == 0 and not failure:
            try:
                finalize(tmp)
                commit_output_dir(tmp, out_dir)
            except OSError as exc:
                failure = str(exc)
        failure = broadcast_object(failure, src=0)
    finally:
        if rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
    if failure:
        raise OSError(f"writing {out_dir} failed: {failure}")
    return Path(out_dir)
