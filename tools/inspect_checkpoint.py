#!/usr/bin/env python3
"""Inspect a checkpoint without loading it: step, config, parameter counts, shard layout.

    python tools/inspect_checkpoint.py RUN_DIR                      # its newest checkpoint
    python tools/inspect_checkpoint.py RUN_DIR/checkpoints/step_00000042
    python tools/inspect_checkpoint.py ckpts/student-tp2            # `dgrpo convert` output
    python tools/inspect_checkpoint.py PATH --json                  # machine-readable

Accepts a training checkpoint (``step_N/`` with ``model/``, ``optimizer/``, ``rng/``,
``trainer_state.json``), a run directory (its ``checkpoints/latest``), or a Megatron checkpoint
(``dgrpo_checkpoint.json`` + ``mp_rank_TT_PPP/model.safetensors``). Only JSON files and the
JSON headers of safetensors files are read: no tensor data, nothing unpickled.

Parameter counts: ``per rank`` is what each (TP, PP) shard stores; ``total`` counts every
tensor once (replicated tensors such as norms once, TP-split tensors summed over ranks, the
last stage's copy of tied embeddings not at all), so it includes the vocabulary padding rows.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
from pathlib import Path

METADATA_FILE = "dgrpo_checkpoint.json"  # megatron_dgrpo.models.convert.METADATA_FILE
STATE_FILE = "trainer_state.json"        # megatron_dgrpo.train.checkpoint.STATE_FILE
MAX_HEADER_BYTES = 100 * 2**20


class InspectError(ValueError):
    """The path is not something this tool can read; the message says why."""


def safetensors_header(path: Path) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} plus "__metadata__" if present."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise InspectError(f"{path}: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER_BYTES:
            raise InspectError(f"{path}: header length {length} is not plausible")
        try:
            return json.loads(handle.read(length))
        except json.JSONDecodeError as exc:
            raise InspectError(f"{path}: unreadable safetensors header ({exc})") from None


def _tensors(header: dict) -> dict[str, dict]:
    return {k: v for k, v in header.items() if k != "__metadata__"}


def _shard_summary(path: Path) -> dict:
    tensors = _tensors(safetensors_header(path))
    return {"file": str(path), "tensors": len(tensors),
            "parameters": sum(math.prod(t["shape"]) for t in tensors.values()),
            "bytes": sum(t["data_offsets"][1] - t["data_offsets"][0] for t in tensors.values()),
            "dtypes": sorted({t["dtype"] for t in tensors.values()}),
            "shapes": {name: t["shape"] for name, t in tensors.items()}}


def _stage_roles(model_config: dict, pp_rank: int,
                 pipeline_parallel: int) -> tuple[set[str], set[str]] | None:
    """Local names of a stage's TP-replicated tensors and of its copies of another stage's
    tensor (the tied output layer); None if this package's mapping is not importable."""
    try:
        from megatron_dgrpo.models.config import ModelConfig
        from megatron_dgrpo.models.mapping import TPSplit, stage_params
    except ImportError:
        return None
    params = stage_params(ModelConfig(**model_config), pp_rank, pipeline_parallel)
    return ({p.local_name for p in params if p.rule.split is TPSplit.REPLICATED},
            {p.local_name for p in params if not p.rule.exported})


def inspect_model(model_dir: Path) -> dict:
    """Config, layout and parameter counts of a Megatron checkpoint directory."""
    meta_file = model_dir / METADATA_FILE
    if not meta_file.is_file():
        raise InspectError(f"{model_dir} is not a Megatron checkpoint (no {METADATA_FILE})")
    meta = json.loads(meta_file.read_text())
    tp, pp = int(meta["tensor_parallel"]), int(meta["pipeline_parallel"])
    shards, total, exact = [], 0, True
    for pp_rank in range(pp):
        stage = []
        for tp_rank in range(tp):
            path = model_dir / f"mp_rank_{tp_rank:02d}_{pp_rank:03d}" / "model.safetensors"
            if not path.is_file():
                raise InspectError(f"shard {path} is missing (layout TP={tp} x PP={pp})")
            stage.append({"tp_rank": tp_rank, "pp_rank": pp_rank, **_shard_summary(path)})
        roles = _stage_roles(meta["model"], pp_rank, pp)
        exact &= roles is not None
        replicated, copies = roles or (set(), set())
        for name, shape in stage[0]["shapes"].items():
            if name in copies:
                continue
            if name in replicated:
                total += math.prod(shape)
            else:
                total += sum(math.prod(s["shapes"].get(name, [0])) for s in stage)
        shards.extend(stage)
    for shard in shards:
        del shard["shapes"]
    return {"path": str(model_dir), "format": f"{meta.get('format')} v{meta.get('format_version')}",
            "model": meta["model"], "tensor_parallel": tp, "pipeline_parallel": pp,
            "padded_vocab_size": meta.get("padded_vocab_size"),
            "parameters": {"total": total, "total_exact": exact,
                           "per_rank": {f"tp{s['tp_rank']}_pp{s['pp_rank']}": s["parameters"]
                                        for s in shards}},
            "shards": shards}


def inspect_training(step_dir: Path) -> dict:
    """Step, layout, per-rank optimizer/RNG files and the model of a training checkpoint."""
    state = json.loads((step_dir / STATE_FILE).read_text())
    run_config = step_dir.parent.parent / "config.yaml"
    report = {"kind": "training checkpoint", "path": str(step_dir), "step": state.get("step"),
              "layout": state.get("layout"), "trainer_state_keys": sorted(state.get("state", {})),
              "run_config": str(run_config) if run_config.is_file() else None,
              "model": inspect_model(step_dir / "model")}
    for kind in ("optimizer", "rng"):
        files = sorted((step_dir / kind).glob("rank_*.safetensors"))
        report[kind] = [{"file": f.name, "tensors": len(_tensors(safetensors_header(f))),
                         "bytes": f.stat().st_size} for f in files]
    world = (state.get("layout") or {}).get("world_size")
    if world is not None and len(report["optimizer"]) != world:
        report["warning"] = (f"{len(report['optimizer'])} optimizer files for world_size {world}: "
                             "the checkpoint is incomplete")
    return report


def inspect_path(path: Path) -> dict:
    """Dispatch on what ``path`` is: run dir, training checkpoint, or Megatron checkpoint."""
    if not path.exists():
        raise InspectError(f"{path} does not exist")
    if (path / "checkpoints").is_dir():  # a run directory: its newest complete checkpoint
        pointer = path / "checkpoints" / "latest"
        candidates = sorted(p for p in (path / "checkpoints").glob("step_*")
                            if (p / STATE_FILE).is_file())
        named = path / "checkpoints" / pointer.read_text().strip() if pointer.is_file() else None
        step_dir = named if named is not None and (named / STATE_FILE).is_file() else (
            candidates[-1] if candidates else None)
        if step_dir is None:
            raise InspectError(f"run directory {path} has no complete checkpoint yet")
        return inspect_training(step_dir)
    if (path / STATE_FILE).is_file():
        return inspect_training(path)
    if (path / METADATA_FILE).is_file():
        return {"kind": "megatron checkpoint", **inspect_model(path)}
    raise InspectError(f"{path} is neither a run directory, a training checkpoint "
                       f"({STATE_FILE}) nor a Megatron checkpoint ({METADATA_FILE})")


def _human(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def format_report(report: dict) -> str:
    model = report["model"] if report["kind"] == "training checkpoint" else report
    lines = [f"{report['kind']}: {report['path']}"]
    if report["kind"] == "training checkpoint":
        lines.append(f"step: {report['step']}   layout: {report['layout']}")
        if report["run_config"]:
            lines.append(f"run config: {report['run_config']}")
        lines.append(f"trainer state: {', '.join(report['trainer_state_keys']) or '-'}")
        for kind in ("optimizer", "rng"):
            lines.append(f"{kind}: " + ", ".join(f"{f['file']} ({f['tensors']} tensors)"
                                                for f in report[kind]))
        if "warning" in report:
            lines.append(f"WARNING: {report['warning']}")
    cfg = model["model"]
    lines.append(f"model: {cfg.get('architecture')} layers={cfg.get('num_layers')} "
                 f"hidden={cfg.get('hidden_size')} heads={cfg.get('num_attention_heads')}/"
                 f"{cfg.get('num_query_groups')} vocab={cfg.get('vocab_size')} "
                 f"(padded {model['padded_vocab_size']}) dtype={cfg.get('params_dtype')}")
    params = model["parameters"]
    lines.append(f"layout: TP={model['tensor_parallel']} x PP={model['pipeline_parallel']}   "
                 f"parameters: total {_human(params['total'])} ({params['total']})"
                 + ("" if params["total_exact"] else " (replication unknown: upper bound)"))
    for shard in model["shards"]:
        lines.append(f"  mp_rank_{shard['tp_rank']:02d}_{shard['pp_rank']:03d}: "
                     f"{shard['tensors']} tensors, {_human(shard['parameters'])} params, "
                     f"{_human(shard['bytes'])}B, {'/'.join(shard['dtypes'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Inspect a megatron-dgrpo checkpoint (headers only): step, config, "
                    "parameter counts, shard layout.")
    parser.add_argument("path", type=Path,
                        help="run directory, RUN_DIR/checkpoints/step_N, or Megatron checkpoint")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        report = inspect_path(args.path)
    except (KeyError, TypeError, ValueError) as exc:  # InspectError, bad JSON, bad config
        print(f"inspect_checkpoint: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
