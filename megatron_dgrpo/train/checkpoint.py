"""Trainer checkpoints: everything needed to resume a run exactly, written atomically.

Layout of one checkpoint (``RUN_DIR/checkpoints/step_00000042/``)::

    model/                      Megatron checkpoint (models/convert.py format, re-shardable)
    optimizer/rank_00000.safetensors   this rank's optimizer state (tensors; scalars and
                                       param_groups as JSON in the safetensors metadata)
    rng/rank_00000.safetensors         this rank's RNG states (torch CPU, CUDA, Megatron's
                                       model-parallel streams, Python, NumPy)
    trainer_state.json          step, data-sampler position, scheduler, anything the loop
                                needs; written last: a directory without it is not a checkpoint

The directory is assembled under a temporary name (``.step_00000042.partial-XXXX``) and
renamed into place, then ``checkpoints/latest`` is replaced atomically, so a crash or a
pre-emption mid-save (``kill -9`` included, at any point: ``tests/reliability``) never
leaves a half-written checkpoint that resume could pick. Resume takes the checkpoint
``latest`` names (the newest complete one if it names none). A save that died between the
rename and the pointer update leaves a complete checkpoint newer than ``latest``; the run
resumes from ``latest`` and re-saves that step over it (the old copy is set aside and only
deleted once the new one is in place). Only the newest ``keep_last`` checkpoints are kept;
an old one loses its ``trainer_state.json`` before its files go, so a deletion cut short
leaves no checkpoint-looking remains, and :func:`remove_interrupted_saves` clears such
remains and the temporary directories of saves that died. A save that fails (disk full,
directory not writable) raises :class:`CheckpointWriteError` on every rank and leaves the
earlier checkpoints as they were. Nothing is unpickled on load: safetensors and JSON only.

Resume needs the same world layout (TP, PP, DP) as the save, because optimizer and RNG
states are per rank; to change the layout, re-shard the model with ``dgrpo convert reshard``
and start a new run from it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from megatron_dgrpo.errors import RunFailure
from megatron_dgrpo.models.config import ModelConfig
from megatron_dgrpo.models.convert import (
    CheckpointError,
    load_megatron_checkpoint_into,
    open_safetensors,
    read_json,
    save_megatron_model,
)
from megatron_dgrpo.outputs import write_dir_from_all_ranks
from megatron_dgrpo.parallel.collectives import barrier, world_rank, world_size
from megatron_dgrpo.train.faults import kill_if_fires

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
log = logging.getLogger(__name__)


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed here; the message says why."""


class CheckpointWriteError(RunFailure):
    """A checkpoint could not be written; nothing of it was kept, earlier ones are intact."""


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def _rank_file(root: Path, kind: str) -> Path:
    return root / kind / f"rank_{world_rank():05d}.safetensors"


# ---------------------------------------------------------------------------------------
# Optimizer and RNG state as safetensors + JSON


def _optimizer_to_safetensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    meta = {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}
    return tensors, meta


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of ``path``; CheckpointError naming it when damaged."""
    with open_safetensors(path) as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata()


def _optimizer_from_safetensors(optimizer: torch.optim.Optimizer, path: Path) -> None:
    tensors, meta = _read_safetensors(path)
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, param_id, key = name.split(".", 2)
        state.setdefault(int(param_id), {})[key] = tensor
    for param_id, entries in json.loads(meta["scalars"]).items():
        state.setdefault(int(param_id), {}).update(entries)
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})


def _rng_to_safetensors() -> tuple[dict, dict]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    for name, value in get_cuda_rng_tracker().get_states().items():
        tensors[f"tracker.{name}"] = value.cpu() if torch.is_tensor(value) else value
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    meta = {"python": json.dumps(random.getstate()),
            "numpy": json.dumps([kind, int(pos), int(has_gauss), float(cached)])}
    return tensors, meta


def _rng_from_safetensors(path: Path) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tensors, meta = _read_safetensors(path)
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    tracker = {name.split(".", 1)[1]: value for name, value in tensors.items()
               if name.startswith("tracker.")}
    get_cuda_rng_tracker().set_states(tracker)
    version, state, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(state), gauss))
    kind, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos,
                         has_gauss, cached))


# ---------------------------------------------------------------------------------------
# Save / find / load


def save_training_checkpoint(run_dir: str | os.PathLike, step: int, model: torch.nn.Module,
                             model_config: ModelConfig, optimizer: torch.optim.Optimizer,
                             trainer_state: dict[str, Any], keep_last: int = 2) -> Path:
    """Write checkpoint ``step`` (call on every rank). Returns its directory.

    ``trainer_state`` must be JSON-serialisable (step counters, sampler state, scheduler
    state, ...); it is returned by :func:`load_training_checkpoint`.
    """
    final = checkpoint_dir(run_dir, step)

    def write_rank_files(tmp: Path) -> None:
        save_megatron_model(model, model_config, tmp / "model")
        for kind, (tensors, meta) in (("optimizer", _optimizer_to_safetensors(optimizer)),
                                      ("rng", _rng_to_safetensors())):
            path = _rank_file(tmp, kind)
            path.parent.mkdir(exist_ok=True)
            save_file(tensors, str(path), metadata=meta)
        kill_if_fires("checkpoint.rank_files", step)

    def write_state(tmp: Path) -> None:
        layout = {"world_size": world_size()}
        (tmp / STATE_FILE).write_text(json.dumps(
            {"step": step, "layout": layout, "state": trainer_state}, indent=2) + "\n")
        kill_if_fires("checkpoint.state", step)

    previous = latest_checkpoint(run_dir)
    replaced = _set_aside(final) if world_rank() == 0 else None
    try:
        write_dir_from_all_ranks(final, write_rank_files, write_state)
    except OSError as exc:
        if replaced is not None:
            os.rename(replaced, final)
        kept = f"the previous checkpoint {previous} is intact" if previous else \
            "there is no earlier checkpoint"
        raise CheckpointWriteError(
            f"could not write checkpoint {final}: {exc}. Nothing of it was kept and {kept}; "
            "free disk space or make the directory writable, then rerun to resume") from exc
    if replaced is not None:
        shutil.rmtree(replaced)
    kill_if_fires("checkpoint.renamed", step)
    if world_rank() == 0:
        try:  # the checkpoint is complete: failures here only cost disk space
            _point_latest(Path(run_dir), final.name)
            _prune(Path(run_dir), keep_last, step)
        except OSError as exc:
            log.warning("checkpoint %s is saved, but updating %s or removing old checkpoints "
                        "failed: %s", final, LATEST, exc)
    barrier()
    return final


def _set_aside(final: Path) -> Path | None:
    """Move an existing checkpoint ``final`` (newer than ``latest``: its save died before the
    pointer moved, and the run resumed from an earlier one) to a hidden name; returns it."""
    if not final.exists():
        return None
    aside = final.with_name(f".{final.name}.replaced-{os.getpid()}")
    os.rename(final, aside)
    return aside


def _point_latest(run_dir: Path, name: str) -> None:
    pointer = run_dir / CHECKPOINTS / LATEST
    tmp = pointer.with_suffix(".tmp")
    tmp.write_text(name + "\n")
    os.replace(tmp, pointer)


def _complete_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())


def _prune(run_dir: Path, keep_last: int, step: int) -> None:
    for old in _complete_checkpoints(run_dir)[:-keep_last]:
        (old / STATE_FILE).unlink()  # no longer a checkpoint, before any of its files go
        kill_if_fires("checkpoint.pruning", step)
        shutil.rmtree(old)


def remove_interrupted_saves(run_dir: str | os.PathLike) -> list[Path]:
    """Delete what saves and prunings that died left in ``run_dir``'s checkpoints: temporary
    directories and ``step_*`` directories without ``trainer_state.json``. Returns them.
    Call on one rank, before the run saves again."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    leftovers = sorted([*root.glob(".step_*.partial-*"), *root.glob(".step_*.replaced-*"),
                        *(p for p in root.glob("step_*") if not (p / STATE_FILE).is_file())])
    for path in leftovers:
        shutil.rmtree(path)
    return leftovers


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` names, else the newest complete one, or None. Partial
    directories are ignored."""
    run_dir = Path(run_dir)
    pointer = run_dir / CHECKPOINTS / LATEST
    if pointer.is_file():
        named = run_dir / CHECKPOINTS / pointer.read_text().strip()
        if (named / STATE_FILE).is_file():
            return named
    complete = _complete_checkpoints(run_dir)
    return complete[-1] if complete else None


def load_training_checkpoint(path: str | os.PathLike, model: torch.nn.Module,
                             optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNG states on every rank; return the trainer state.

    The returned dict has ``step`` and ``state`` (what was passed to the save).
    """
    path = Path(path)
    try:
        saved = read_json(path / STATE_FILE)
        _check_layout(path, saved)
        load_megatron_checkpoint_into(model, path / "model")
        _optimizer_from_safetensors(optimizer, _rank_file(path, "optimizer"))
        _rng_from_safetensors(_rank_file(path, "rng"))
    except CheckpointError as exc:
        raise ResumeError(f"cannot resume from {path}: {exc}. Nothing was changed; to resume "
                          "from the checkpoint before it, move this one out of "
                          f"{path.parent}") from None
    return {"step": saved["step"], "state": saved["state"]}


def _check_layout(path: Path, saved: dict[str, Any]) -> None:
    if saved["layout"]["world_size"] != world_size():
        raise ResumeError(
            f"{path} was saved by {saved['layout']['world_size']} ranks, this run has "
            f"{world_size()}; resume needs the same layout (re-shard the model with "
            f"`dgrpo convert reshard` and start a new run from it instead)")
