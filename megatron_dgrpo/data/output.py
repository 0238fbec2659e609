"""All-or-nothing output directories: write into a hidden temporary sibling, rename when done."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class OutputExistsError(ValueError):
    """The output directory exists and is not empty."""


def check_output_dir(out_dir: str | Path) -> None:
    """Raise OutputExistsError unless ``out_dir`` is absent or an empty directory (call before work)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(
            f"refusing to overwrite {str(out)!r}: it exists and is not an empty directory"
        )


@contextmanager
def atomic_output_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``out_dir`` if the block completes.

    Refuses (OutputExistsError) an ``out_dir`` that exists and is not an empty directory; on any
    exception the temporary directory is removed and ``out_dir`` is left as it was.
    """
    check_output_dir(out_dir)
    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
