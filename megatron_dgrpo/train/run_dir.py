"""Whose run directory is it: a run starts only in a missing or empty directory (the Slurm
scripts' job records aside), and resumes only in the directory of the same run (its
``config.yaml`` equal to this config but for :data:`RESUMABLE` options). Checked before any
work, so a mistyped ``run_dir`` never writes into, or resumes, another run's results or any
other directory's files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from megatron_dgrpo.config import dump_yaml

CONFIG_FILE = "config.yaml"
# What may be in a run's directory before its first start: the job records the Slurm scripts
# write before the trainer runs (slurm/lib/common.sh, ``dgrpo_job_dir``).
LAUNCHER_RECORDS = ("slurm",)
# What may change when a run resumes: where its directory is (moved or copied), how long it
# runs, and how it saves, logs and waits.
RESUMABLE = ("run_dir", "steps", "save_every", "keep_last", "logging", "max_skipped_steps",
             "parallel.timeout_s", "rollout.retries")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _resumable(key: str) -> bool:
    return any(key == name or key.startswith(name + ".") for name in RESUMABLE)


def check_run_dir(config) -> None:
    """ValueError unless ``config.run_dir`` is missing, empty, or this run's (see the module
    docstring). Reads only; call on every rank before anything is built or written."""
    run_dir = Path(config.run_dir)
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ValueError(f"run_dir {run_dir} is a file, not a directory; choose another run_dir")
    saved = run_dir / CONFIG_FILE
    if not saved.is_file():
        if any(not p.name.startswith(f".{CONFIG_FILE}.") and p.name not in LAUNCHER_RECORDS
               for p in run_dir.iterdir()):
            raise ValueError(f"run_dir {run_dir} is not empty and holds no run (no {CONFIG_FILE}): "
                             "choose a new run_dir; nothing in it was touched")
        return
    try:
        theirs = _flatten(yaml.safe_load(saved.read_text(encoding="utf-8")))
    except yaml.YAMLError as exc:
        raise ValueError(f"run_dir {run_dir} holds a {CONFIG_FILE} that is not valid YAML "
                         f"({exc}); choose a new run_dir") from None
    ours = _flatten(yaml.safe_load(dump_yaml(config)))
    differ = sorted(key for key in set(theirs) | set(ours) if not _resumable(key)
                    and theirs.get(key, "<unset>") != ours.get(key, "<unset>"))
    if differ:
        shown = ", ".join(f"{key} ({theirs.get(key, '<unset>')!r} there, "
                          f"{ours.get(key, '<unset>')!r} here)" for key in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise ValueError(
            f"run_dir {run_dir} holds another run: its {CONFIG_FILE} differs in {shown}{more}. "
            f"Choose a new run_dir, or resume that run with its own config (on resume only "
            f"{', '.join(RESUMABLE)} may change); nothing in it was touched")


def write_run_config(config) -> None:
    """``RUN_DIR/config.yaml`` (the resolved config), replaced atomically."""
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{CONFIG_FILE}.{os.getpid()}.tmp"
    tmp.write_text(dump_yaml(config), encoding="utf-8")
    os.replace(tmp, run_dir / CONFIG_FILE)
