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
from typing import Iterator


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
