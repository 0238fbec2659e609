"""Teacher top-k log-probs cached on disk: the off-policy KD baseline without a live teacher.

The cache holds, for every response token of every example (prompt + reference answer, built
by :func:`megatron_dgrpo.train.batch.answer_sequences` exactly as the SFT/KD trainer builds
them), the teacher's ``k`` most likely next tokens and their
full-vocabulary log-probabilities. Layout::

    CACHE/index.json                  format, k, vocab size, tokenizer, and per example id:
                                      shard, first row, number of rows (response tokens)
    CACHE/topk-00000.safetensors      indices int32 [rows, k], logp float32 [rows, k]

Written with ``dgrpo teacher-cache`` / ``tools/cache_teacher_topk.py`` (on every rank of a
TP group under torchrun, or one process); read by the trainer with
``teacher_topk_cache: CACHE`` and ``loss.kl_estimator: topk``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_dgrpo.outputs import atomic_output_dir, refuse_existing
from megatron_dgrpo.parallel.collectives import is_initialized, world_rank
from megatron_dgrpo.train.batch import answer_sequences

FORMAT = "dgrpo-teacher-topk"
INDEX_FILE = "index.json"


class TeacherTopKCache:
    """Read access to a cache directory (lazy: only the rows asked for are read)."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.path = Path(cache_dir)
        index_path = self.path / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(f"{cache_dir} is not a teacher top-k cache (no {INDEX_FILE})")
        index = json.loads(index_path.read_text())
        if index.get("format") != FORMAT:
            raise ValueError(f"{index_path}: format {index.get('format')!r}, expected {FORMAT!r}")
        self.k: int = index["k"]
        self.vocab_size: int = index["vocab_size"]
        self._examples: dict[str, list[int]] = index["examples"]

    def lookup(self, example_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices int64 [n, k], logp float32 [n, k])`` for the example's n response tokens."""
        if example_id not in self._examples:
            raise KeyError(f"example {example_id!r} is not in the teacher cache {self.path}")
        shard, first, rows = self._examples[example_id]
        with safe_open(str(self.path / _shard_name(shard)), framework="pt") as handle:
            indices = handle.get_slice("indices")[first:first + rows]
            logp = handle.get_slice("logp")[first:first + rows]
        return indices.long(), logp


def _shard_name(shard: int) -> str:
    return f"topk-{shard:05d}.safetensors"


def write_teacher_cache(out_dir: str | os.PathLike, teacher: torch.nn.Module, vocab_size: int,
                        tokenizer, examples: Iterable, k: int = 32, batch_size: int = 4,
                        rows_per_shard: int = 1 << 20, tp_group=None) -> Path | None:
    """Run the teacher over prompt + reference answer of each example and cache its top-k.

    Only the answer positions reach the output layer (chunked, vocabulary-parallel top-k:
    no ``[T, V]`` logits). Call on every rank of the teacher's TP group with the same
    examples; rank 0 writes. Returns the cache directory on rank 0, None elsewhere.
    """
    from megatron_dgrpo.models.forward import final_hidden_states, output_weight
    from megatron_dgrpo.parallel.vocab import default_chunk_tokens, vocab_parallel_topk

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    writer = not is_initialized() or world_rank() == 0
    if writer:
        refuse_existing(out_dir)
    index = {"format": FORMAT, "k": k, "vocab_size": vocab_size,
             "tokenizer": getattr(tokenizer, "name", ""), "examples": {}}
    buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
    shard, rows_in_shard = 0, 0
    teacher.eval()
    weight = output_weight(teacher)
    chunk = default_chunk_tokens(weight.shape[0])
    with atomic_output_dir(out_dir) if writer else contextlib.nullcontext() as tmp:
        def flush() -> None:
            nonlocal shard, rows_in_shard
            if writer and buffers:
                save_file({"indices": torch.cat([b[0] for b in buffers]).int().contiguous(),
                           "logp": torch.cat([b[1] for b in buffers]).contiguous()},
                          str(tmp / _shard_name(shard)))
            buffers.clear()
            shard, rows_in_shard = shard + 1, 0

        for batch in _batched(examples, batch_size):
            sequences = answer_sequences(batch, tokenizer)
            with torch.no_grad():
                hidden = final_hidden_states(teacher, sequences.tokens, sequences.positions)
                hidden = hidden[sequences.loss_mask]
                pieces = [vocab_parallel_topk(hidden[i:i + chunk] @ weight.T, k, vocab_size,
                                              tp_group) for i in range(0, len(hidden), chunk)]
            indices = torch.cat([ids for ids, _ in pieces])
            logp = torch.cat([lp for _, lp in pieces])
            counts = sequences.loss_mask.sum(dim=1).tolist()
            for example, rows, idx, lp in zip(batch, counts, indices.split(counts),
                                              logp.split(counts)):
                if rows_in_shard and rows_in_shard + rows > rows_per_shard:
                    flush()
                index["examples"][example.id] = [shard, rows_in_shard, rows]
                buffers.append((idx, lp))
                rows_in_shard += rows
        flush()
        if writer:
            (tmp / INDEX_FILE).write_text(json.dumps(index) + "\n")
    return Path(out_dir) if writer else None


def _batched(items: Iterable, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, help="teacher Megatron checkpoint directory")
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer dir or sentencepiece .model")
    parser.add_argument("--data", nargs="+", required=True, help="parquet files or directories")
    parser.add_argument("--out", required=True, help="new cache directory")
    parser.add_argument("--k", type=int, default=32, help="top-k tokens per position (default 32)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tp", type=int, default=None,
                        help="tensor-parallel size (default: the torchrun world size)")
    parser.add_argument("--max-prompt-tokens", type=int, default=131072)
    parser.add_argument("--limit", type=int, default=None, help="only the first N usable rows")


def run_cache(args: argparse.Namespace) -> int:
    import itertools

    from megatron.core import parallel_state as ps

    from megatron_dgrpo.data.chat import load_chat_tokenizer
    from megatron_dgrpo.data.longblocks import LongBlocksConfig, LongBlocksLoader
    from megatron_dgrpo.models.config import ParallelConfig
    from megatron_dgrpo.models.loading import checkpoint_model
    from megatron_dgrpo.models.provider import initialize_parallel
    from megatron_dgrpo.parallel.launch import ensure_process_group_env

    world_size = ensure_process_group_env()
    parallel = ParallelConfig(tensor_parallel=args.tp or world_size)
    tokenizer = load_chat_tokenizer(args.tokenizer)
    refuse_existing(args.out)
    initialize_parallel(parallel)
    teacher, config = checkpoint_model(args.teacher, parallel, tokenizer)
    loader = LongBlocksLoader(LongBlocksConfig(paths=tuple(args.data), split="all",
                                               max_prompt_tokens=args.max_prompt_tokens), tokenizer)
    examples = itertools.islice(loader, args.limit) if args.limit else loader
    out = write_teacher_cache(args.out, teacher, config.vocab_size, tokenizer, examples, k=args.k,
                              batch_size=args.batch_size,
                              tp_group=ps.get_tensor_model_parallel_group())
    if out is not None:
        print(f"wrote {out} ({loader.summary.format()})")
    return 0
