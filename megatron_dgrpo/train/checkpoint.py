"""Trainer checkpoints: everything needed to resume a run exactly, written atomically.

Layout of one checkpoint (``RUN_DIR/checkpoints/step_00000042/``)::

    model/                      Megatron checkpoint (models/convert.py format, re-shardable)
    optimizer/rank_00000.safetensors   this rank's optimizer state (tensors; scalars and
                                       param_groups as JSON in the safetensors metadata)
    rng/rank_00000.safetensors         this rank's RNG states (torch CPU, CUDA, Megatron's
                                       model-parallel streams, Python, NumPy)
    trainer_state.json          step, data-sampler position, scheduler, anything the loop
                                needs; written last: a directory without it is not a checkpoint

The directory is assembled under a temporary name and renamed into place, then
``checkpoints/latest`` is replaced atomically, so a crash or a pre-emption mid-save never
leaves a half-written checkpoint that resume could pick. Only the newest ``keep_last``
checkpoints are kept. Nothing is unpickled on load: safetensors and JSON only.

Resume needs the same world layout (TP, PP, DP) as the save, because optimizer and RNG
states are per rank; to change the layout, re-shard the model with ``dgrpo convert reshard``
and start a new run from it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from megatron_dgrpo.models.config import ModelConfig
from megatron_dgrpo.models.convert import load_megatron_checkpoint_into, save_megatron_model
from megatron_dgrpo.outputs import write_dir_from_all_ranks
from megatron_dgrpo.parallel.collectives import barrier, world_rank, world_size

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed here; the message says why."""


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


def _optimizer_from_safetensors(optimizer: torch.optim.Optimizer, path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    tensors = load_file(str(path))
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
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    tensors = load_file(str(path))
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

    def write_state(tmp: Path) -> None:
        layout = {"world_size": world_size()}
        (tmp / STATE_FILE).write_text(json.dumps(
            {"step": step, "layout": layout, "state": trainer_state}, indent=2) + "\n")

    write_dir_from_all_ranks(final, write_rank_files, write_state)
    if world_rank() == 0:
        _point_latest(Path(run_dir), final.name)
        _prune(Path(run_dir), keep_last)
    barrier()
    return final


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


def _prune(run_dir: Path, keep_last: int) -> None:
    for old in _complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None. Partial directories are ignored."""
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
    saved = json.loads((path / STATE_FILE).read_text())
    if saved["layout"]["world_size"] != world_size():
        raise ResumeError(
            f"{path} was saved by {saved['layout']['world_size']} ranks, this run has "
            f"{world_size()}; resume needs the same layout (re-shard the model with "
            f"`dgrpo convert reshard` and start a new run from it instead)")
    load_megatron_checkpoint_into(model, path / "model")
    _optimizer_from_safetensors(optimizer, _rank_file(path, "optimizer"))
    _rng_from_safetensors(_rank_file(path, "rng"))
    return {"step": saved["step"], "state": saved["state"]}
