"""Checkpoint conversion between Hugging Face and Megatron layouts, built on :mod:`.mapping`.

Megatron checkpoint layout (``FORMAT``, version ``FORMAT_VERSION``)::

    CKPT/
      dgrpo_checkpoint.json            model config, TP/PP sizes, padded vocab, HF config
      mp_rank_{tp:02d}_{pp:03d}/model.safetensors
                                       one per (tp_rank, pp_rank): the local shard, named as
                                       in that rank's local-spec GPTModel.state_dict()
                                       (``_extra_state`` entries excluded)
      hf_assets/                       tokenizer / generation files copied from the HF dir

Hugging Face layout: ``config.json`` plus ``model.safetensors`` or sharded
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``.

Only safetensors are read (never pickles). Every writer builds its output in a temporary
directory next to the destination and renames it into place at the end, so a failure leaves
nothing behind; an existing non-empty destination is an error (:mod:`megatron_dgrpo.outputs`). Tensor values and dtypes are copied
exactly: HF -> Megatron -> HF is bitwise, and re-sharding between TP/PP layouts is exact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_dgrpo.models import mapping
from megatron_dgrpo.models.config import ModelConfig
from megatron_dgrpo.models.mapping import StageParam
from megatron_dgrpo.outputs import (
    OutputExistsError, atomic_output_dir, refuse_existing, write_dir_from_all_ranks)

FORMAT = "megatron-dgrpo-safetensors"
FORMAT_VERSION = 1
METADATA_FILE = "dgrpo_checkpoint.json"
HF_ASSETS_DIR = "hf_assets"
HF_INDEX_FILE = "model.safetensors.index.json"
HF_SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

# Small HF files worth carrying through a Megatron checkpoint (tokenizer, generation).
_ASSET_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
_HF_WEIGHT_FILES = ("config.json", HF_INDEX_FILE)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written as asked; the message says why."""


def open_safetensors(path: str | os.PathLike):
    """``safe_open(path)`` (a context manager too), or a :class:`CheckpointError` naming the
    file when it cannot be read: truncated, corrupted, or not safetensors at all."""
    try:
        return safe_open(str(path), "pt")
    except Exception as exc:  # safetensors raises its own SafetensorError (or OSError)
        raise CheckpointError(f"{path} is truncated or corrupted "
                              f"({type(exc).__name__}: {exc})") from None


def read_json(path: Path) -> Any:
    """The JSON document in ``path``; a :class:`CheckpointError` naming it if it is not one."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None


def shard_dir_name(tp_rank: int, pp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


# ---------------------------------------------------------------------------------------
# Hugging Face checkpoints


class HFCheckpoint:
    """Read access to a Hugging Face directory: ``config.json`` and safetensors weights."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.path = Path(hf_dir)
        if not self.path.is_dir():
            raise FileNotFoundError(f"Hugging Face checkpoint directory {self.path} not found")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{self.path} has no config.json")
        self.hf_config: dict[str, Any] = read_json(config_file)
        self.config = ModelConfig.from_hf_config(self.hf_config)
        self._file_of = self._weight_files()
        self._open: dict[str, Any] = {}

    def _weight_files(self) -> dict[str, str]:
        index = self.path / HF_INDEX_FILE
        if index.is_file():
            weight_map: dict[str, str] = read_json(index)["weight_map"]
        elif (self.path / HF_SINGLE_FILE).is_file():
            with open_safetensors(self.path / HF_SINGLE_FILE) as handle:
                names = handle.keys()  # a safe_open handle is neither a dict nor iterable
            weight_map = dict.fromkeys(names, HF_SINGLE_FILE)
        else:
            raise CheckpointError(
                f"{self.path} has no {HF_SINGLE_FILE} or {HF_INDEX_FILE} (only safetensors "
                f"weights are read, never pickled .bin/.pt files)")
        absent = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
        if absent:
            raise CheckpointError(f"{index.name} lists weight file(s) not in {self.path}: "
                                  f"{', '.join(absent)}")
        if self.config.tie_word_embeddings:  # some tied checkpoints also store the copy
            weight_map.pop("lm_head.weight", None)
        return weight_map

    def _handle(self, file_name: str):
        if file_name not in self._open:
            self._open[file_name] = open_safetensors(self.path / file_name)
        return self._open[file_name]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """name -> shape of every tensor, read from the headers only."""
        return {name: tuple(self._handle(f).get_slice(name).get_shape())
                for name, f in self._file_of.items()}

    def tensor(self, name: str) -> torch.Tensor:
        return self._handle(self._file_of[name]).get_tensor(name)

    def asset_files(self) -> list[Path]:
        """Tokenizer/generation files to carry along (everything small that is not weights)."""
        return sorted(p for p in self.path.iterdir()
                      if p.is_file() and p.suffix in _ASSET_SUFFIXES
                      and p.name not in _HF_WEIGHT_FILES)


def _check_hf_weights(hf: HFCheckpoint) -> None:
    try:
        mapping.check_hf_tensors(hf.config, hf.shapes())
    except ValueError as exc:
        raise CheckpointError(f"{hf.path}: {exc}") from None


def write_hf_weights(out_dir: Path, tensors: Iterable[tuple[str, torch.Tensor]],
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write ``(name, tensor)`` pairs as HF safetensors: one file, or shards plus an index.

    Each shard is written as soon as it is full, so memory holds at most one shard.
    """
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total_bytes = 0

    def flush() -> None:
        path = out_dir / f".shard-{len(written) + 1:05d}.safetensors"
        save_file(shard, path, metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
            shard_bytes = 0
        shard[name] = tensor
        shard_bytes += size
        total_bytes += size
    flush()
    if len(written) == 1:
        os.rename(written[0][0], out_dir / HF_SINGLE_FILE)
        return
    weight_map = {}
    for i, (path, names) in enumerate(written, start=1):
        file_name = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        os.rename(path, out_dir / file_name)
        weight_map.update({name: file_name for name in names})
    index = {"metadata": {"total_size": total_bytes},
             "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / HF_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------------------
# Megatron checkpoints


@dataclasses.dataclass(frozen=True)
class MegatronCheckpointInfo:
    """What ``dgrpo_checkpoint.json`` says about a Megatron checkpoint."""

    config: ModelConfig
    tensor_parallel: int
    pipeline_parallel: int
    hf_config: dict[str, Any] | None

    @property
    def padded_vocab_size(self) -> int:
        return self.config.padded_vocab_size(self.tensor_parallel)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION,
                "model": dataclasses.asdict(self.config),
                "tensor_parallel": self.tensor_parallel,
                "pipeline_parallel": self.pipeline_parallel,
                "padded_vocab_size": self.padded_vocab_size,
                "hf_config": self.hf_config}


class MegatronCheckpoint:
    """Read access to a Megatron checkpoint in this package's format, by full tensors.

    ``full_tensor(param)`` works for a parameter of *any* TP/PP layout of the same model:
    sources are matched by the Hugging Face tensors they stand for, so re-sharding (and the
    tied output layer that only PP > 1 layouts hold) needs no special cases.
    """

    def __init__(self, ckpt_dir: str | os.PathLike):
        self.path = Path(ckpt_dir)
        meta_file = self.path / METADATA_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"{self.path} is not a megatron-dgrpo checkpoint "
                                    f"(no {METADATA_FILE})")
        meta = read_json(meta_file)
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{meta_file}: unsupported format {meta.get('format')!r} "
                                  f"version {meta.get('format_version')!r}; this code reads "
                                  f"{FORMAT!r} version {FORMAT_VERSION}")
        config = ModelConfig(**meta["model"])
        config.validate()
        self.info = MegatronCheckpointInfo(config, int(meta["tensor_parallel"]),
                                           int(meta["pipeline_parallel"]), meta["hf_config"])
        if meta["padded_vocab_size"] != self.info.padded_vocab_size:
            raise CheckpointError(f"{meta_file}: padded_vocab_size {meta['padded_vocab_size']} "
                                  f"!= {self.info.padded_vocab_size} from the model config")
        self._sources: dict[tuple[str, ...], tuple[StageParam, int]] = {}
        for pp_rank in range(self.info.pipeline_parallel):
            for param in mapping.stage_params(config, pp_rank, self.info.pipeline_parallel):
                key = mapping.hf_names(param)  # the tied output-layer copy shares its key
                if param.rule.exported or key not in self._sources:
                    self._sources[key] = (param, pp_rank)
        self._open: dict[Path, Any] = {}

    @property
    def config(self) -> ModelConfig:
        return self.info.config

    def shard_file(self, tp_rank: int, pp_rank: int) -> Path:
        return self.path / shard_dir_name(tp_rank, pp_rank) / "model.safetensors"

    def _read_shard(self, tp_rank: int, pp_rank: int, name: str) -> torch.Tensor:
        file = self.shard_file(tp_rank, pp_rank)
        if file not in self._open:
            if not file.is_file():
                raise CheckpointError(f"checkpoint shard {file} is missing")
            self._open[file] = open_safetensors(file)
        handle = self._open[file]
        names = handle.keys()  # a safe_open handle supports no `in`
        if name not in names:
            raise CheckpointError(f"{file} has no tensor {name!r}")
        return handle.get_tensor(name)

    def full_tensor(self, param: StageParam) -> torch.Tensor:
        """The full (merged, unpadded) tensor for ``param`` of any layout of this model."""
        source, pp_rank = self._sources[mapping.hf_names(param)]
        shards = [self._read_shard(tp_rank, pp_rank, source.local_name)
                  for tp_rank in range(self.info.tensor_parallel)]
        expected = mapping.shard_shape(source, self.config, self.info.tensor_parallel)
        for tp_rank, shard in enumerate(shards):
            if tuple(shard.shape) != expected:
                raise CheckpointError(
                    f"{self.shard_file(tp_rank, pp_rank)}: {source.local_name} has shape "
                    f"{tuple(shard.shape)}, expected {expected}")
        return mapping.merge_tp_shards(source.rule.split, shards, self.config.vocab_size)

    def rank_shard(self, param: StageParam, tensor_parallel: int, tp_rank: int,
                   pipeline_parallel: int, pp_rank: int) -> torch.Tensor:
        """Rank (tp_rank, pp_rank)'s shard of ``param`` in a TP x PP layout.

        Read straight from the shard file when the layout is the checkpoint's own;
        otherwise merged from the checkpoint's shards and split again.
        """
        if (tensor_parallel, pipeline_parallel) == (self.info.tensor_parallel,
                                                    self.info.pipeline_parallel):
            return self._read_shard(tp_rank, pp_rank, param.local_name)
        return mapping.split_for_tp(param.rule.split, self.full_tensor(param), tensor_parallel,
                                    self.config.padded_vocab_size(tensor_parallel))[tp_rank]

    def exported_params(self) -> Iterator[StageParam]:
        """Each parameter once, in stage order, skipping copies (tied output layer)."""
        for pp_rank in range(self.info.pipeline_parallel):
            for param in mapping.stage_params(self.config, pp_rank, self.info.pipeline_parallel):
                if param.rule.exported:
                    yield param


def _write_megatron_shards(out_dir: Path, info: MegatronCheckpointInfo,
                           full_tensor: Callable[[StageParam], torch.Tensor]) -> None:
    """Write every (tp, pp) shard file of layout ``info`` and the metadata file."""
    config, tp, pp = info.config, info.tensor_parallel, info.pipeline_parallel
    for pp_rank in range(pp):
        shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
        for param in mapping.stage_params(config, pp_rank, pp):
            full = full_tensor(param)
            expected = mapping.megatron_full_shape(param, config)
            if tuple(full.shape) != expected:
                raise CheckpointError(f"{param.global_name} has shape {tuple(full.shape)}, "
                                      f"expected {expected}")
            pieces = mapping.split_for_tp(param.rule.split, full, tp, info.padded_vocab_size)
            for tp_rank, piece in enumerate(pieces):
                shards[tp_rank][param.local_name] = piece
        for tp_rank, shard in enumerate(shards):
            shard_dir = out_dir / shard_dir_name(tp_rank, pp_rank)
            shard_dir.mkdir()
            save_file(shard, shard_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / METADATA_FILE).write_text(json.dumps(info.to_json(), indent=2) + "\n")


def _copy_assets(files: Iterable[Path], dest: Path) -> None:
    files = list(files)
    if files:
        dest.mkdir(exist_ok=True)
    for file in files:
        shutil.copyfile(file, dest / file.name)


def _check_layout(config: ModelConfig, tensor_parallel: int, pipeline_parallel: int) -> None:
    from megatron_dgrpo.models.config import ParallelConfig, validate_layout

    validate_layout(config, ParallelConfig(tensor_parallel=tensor_parallel,
                                           pipeline_parallel=pipeline_parallel))


# ---------------------------------------------------------------------------------------
# Conversions


def hf_to_megatron_checkpoint(hf_dir: str | os.PathLike, out_dir: str | os.PathLike,
                              tensor_parallel: int = 1, pipeline_parallel: int = 1) -> Path:
    """Convert a Hugging Face directory into a Megatron checkpoint at the given TP/PP."""
    refuse_existing(out_dir)
    hf = HFCheckpoint(hf_dir)
    _check_layout(hf.config, tensor_parallel, pipeline_parallel)
    _check_hf_weights(hf)
    info = MegatronCheckpointInfo(hf.config, tensor_parallel, pipeline_parallel, hf.hf_config)

    def from_hf(param: StageParam) -> torch.Tensor:
        return mapping.hf_to_megatron(param, [hf.tensor(n) for n in mapping.hf_names(param)],
                                      hf.config)

    with atomic_output_dir(out_dir) as tmp:
        _write_megatron_shards(tmp, info, from_hf)
        _copy_assets(hf.asset_files(), tmp / HF_ASSETS_DIR)
    return Path(out_dir)


def reshard_megatron_checkpoint(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike,
                                tensor_parallel: int, pipeline_parallel: int) -> Path:
    """Write the same weights at another TP/PP layout (exact)."""
    refuse_existing(out_dir)
    source = MegatronCheckpoint(ckpt_dir)
    _check_layout(source.config, tensor_parallel, pipeline_parallel)
    info = dataclasses.replace(source.info, tensor_parallel=tensor_parallel,
                               pipeline_parallel=pipeline_parallel)
    with atomic_output_dir(out_dir) as tmp:
        _write_megatron_shards(tmp, info, source.full_tensor)
        assets = source.path / HF_ASSETS_DIR
        _copy_assets(assets.iterdir() if assets.is_dir() else (), tmp / HF_ASSETS_DIR)
    return Path(out_dir)


def hf_config_for(info: MegatronCheckpointInfo) -> dict[str, Any]:
    """The ``config.json`` to write: the original HF one if kept (checked), else generated."""
    if info.hf_config is None:
        return info.config.to_hf_config()
    if ModelConfig.from_hf_config(info.hf_config) != info.config:
        raise CheckpointError("the stored Hugging Face config.json disagrees with the "
                              "checkpoint's model config")
    return info.hf_config


def megatron_to_hf_checkpoint(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike,
                              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Convert a Megatron checkpoint (any TP/PP) into a Hugging Face directory."""
    refuse_existing(out_dir)
    source = MegatronCheckpoint(ckpt_dir)
    hf_config = hf_config_for(source.info)

    def hf_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for param in source.exported_params():
            yield from mapping.megatron_to_hf(param, source.full_tensor(param), source.config)

    with atomic_output_dir(out_dir) as tmp:
        assets = source.path / HF_ASSETS_DIR
        _copy_assets(assets.iterdir() if assets.is_dir() else (), tmp)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        write_hf_weights(tmp, hf_tensors(), max_shard_bytes)
    return Path(out_dir)


# ---------------------------------------------------------------------------------------
# Live models (one call per rank, after initialize_parallel)


def _live_layout() -> tuple[int, int, int]:
    """(tp, tp_rank, pipeline stages S = PP x VP) of this process."""
    from megatron.core import parallel_state as ps

    from megatron_dgrpo.models.chunks import pipeline_stages

    return (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
            pipeline_stages())


def _live_weights(model: torch.nn.Module, config: ModelConfig, stages: int
                  ) -> list[tuple[int, dict[str, tuple[StageParam, torch.Tensor]]]]:
    """``(stage, mapping.live_parameters of its chunk)`` for each chunk of this rank
    (:mod:`megatron_dgrpo.models.chunks`), failing with CheckpointError."""
    from megatron_dgrpo.models.chunks import live_stages

    try:
        return [(stage, mapping.live_parameters(chunk, config, stage, stages))
                for chunk, stage in live_stages(model)]
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc


def load_megatron_checkpoint_into(model: torch.nn.Module, ckpt_dir: str | os.PathLike) -> None:
    """Fill this rank's shard of a live ``GPTModel`` (or of each chunk of its
    ``VirtualStages``) from a checkpoint of any TP/PP layout.

    Values are cast to the model's parameter dtype. Raises CheckpointError if the model is
    not the checkpoint's architecture and size at this rank's layout.
    """
    tp, tp_rank, stages = _live_layout()
    source = MegatronCheckpoint(ckpt_dir)
    with torch.no_grad():
        for stage, weights in _live_weights(model, source.config, stages):
            for name, (param, target) in weights.items():
                shard = source.rank_shard(param, tp, tp_rank, stages, stage)
                if target.shape != shard.shape:
                    raise CheckpointError(f"{name}: model has shape {tuple(target.shape)}, "
                                          f"checkpoint gives {tuple(shard.shape)} at TP={tp}")
                target.copy_(shard)


def save_megatron_model(model: torch.nn.Module, config: ModelConfig,
                        out_dir: str | os.PathLike,
                        hf_config: dict[str, Any] | None = None) -> Path:
    """Write a live model (called on every rank) as a checkpoint at its own TP/PP layout;
    with virtual pipeline stages, at ``pipeline_parallel = PP x VP`` (one shard directory
    per stage, written by the rank that holds it).

    One data-parallel (and context-parallel) replica writes; the directory appears only once
    every shard is written. ``hf_config`` (optional) is kept for export to Hugging Face.
    """
    from megatron.core import parallel_state as ps

    tp, tp_rank, stages = _live_layout()
    info = MegatronCheckpointInfo(config, tp, stages, hf_config)

    def write_shard(tmp: Path) -> None:
        if ps.get_data_parallel_rank(with_context_parallel=True) != 0:
            return
        for stage, weights in _live_weights(model, config, stages):
            for name, (param, tensor) in weights.items():
                expected = mapping.shard_shape(param, config, tp)
                if tuple(tensor.shape) != expected:
                    raise CheckpointError(f"{name} has shape {tuple(tensor.shape)}, "
                                          f"expected {expected}")
            shard_dir = tmp / shard_dir_name(tp_rank, stage)
            shard_dir.mkdir()
            save_file({name: tensor.detach().cpu().contiguous()
                       for name, (_, tensor) in weights.items()},
                      shard_dir / "model.safetensors", metadata={"format": "pt"})

    def write_metadata(tmp: Path) -> None:
        (tmp / METADATA_FILE).write_text(json.dumps(info.to_json(), indent=2) + "\n")

    try:
        return write_dir_from_all_ranks(out_dir, write_shard, write_metadata)
    except OutputExistsError:
        raise
    except OSError as exc:
        raise CheckpointError(f"saving {out_dir} failed: {exc}") from exc
