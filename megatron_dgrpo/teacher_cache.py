"""Teacher top-k log-probs cached on disk: the off-policy KD baseline without a live teacher.

The cache holds, for every response token of every example (prompt + reference answer, as
the SFT/KD trainer builds them), the teacher's ``k`` most likely next tokens and their
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
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_dgrpo.outputs import atomic_output_dir, refuse_existing

FORMAT = "dgrpo-teacher-topk"
INDEX_FILE = "index.json"


def vocab_parallel_topk(logits: torch.Tensor, k: int, vocab_size: int,
                        tp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the full-vocabulary log-softmax of TP-sharded logits, without gathering them.

    Args:
        logits: ``[N, V_local]`` this TP rank's shard (ids ``[r * V_local, (r+1) * V_local)``).
        k: tokens to keep per row; vocab_size: real vocabulary (padding columns excluded).
    Returns:
        ``(indices int64 [N, k], logp float32 [N, k])``, best first, identical on all ranks.
    """
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    local = logits.float()
    ids = torch.arange(tp_rank * local.shape[-1], (tp_rank + 1) * local.shape[-1])
    local = local.masked_fill(ids >= vocab_size, float("-inf"))
    row_max = local.max(dim=-1).values
    if tp_size > 1:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
    sum_exp = (local - row_max[:, None]).exp().sum(dim=-1)
    if tp_size > 1:
        dist.all_reduce(sum_exp, group=tp_group)
    lse = row_max + sum_exp.log()
    values, slots = local.topk(min(k, local.shape[-1]), dim=-1)
    global_ids = ids[slots]
    if tp_size > 1:
        all_values = [torch.empty_like(values) for _ in range(tp_size)]
        all_ids = [torch.empty_like(global_ids) for _ in range(tp_size)]
        dist.all_gather(all_values, values, group=tp_group)
        dist.all_gather(all_ids, global_ids, group=tp_group)
        values, global_ids = torch.cat(all_values, dim=-1), torch.cat(all_ids, dim=-1)
    best, order = values.topk(k, dim=-1)
    return global_ids.gather(-1, order), best - lse[:, None]


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

    Call on every rank of the teacher's TP group with the same examples; rank 0 writes.
    Returns the cache directory on rank 0, None elsewhere.
    """
    from megatron_dgrpo.train.sequences import build_sequences

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    writer = not dist.is_initialized() or dist.get_rank() == 0
    if writer:
        refuse_existing(out_dir)
    index = {"format": FORMAT, "k": k, "vocab_size": vocab_size,
             "tokenizer": getattr(tokenizer, "name", ""), "examples": {}}
    buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
    shard, rows_in_shard = 0, 0
    teacher.eval()
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
            responses = [tokenizer.response_ids(e.user_message, e.reference_answer)
                         for e in batch]
            sequences = build_sequences([e.prompt_ids for e in batch], responses)
            with torch.no_grad():
                logits = teacher(sequences.tokens, sequences.positions, None)
            indices, logp = vocab_parallel_topk(logits[sequences.loss_mask], k, vocab_size,
                                                tp_group)
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
    from megatron_dgrpo.models.convert import MegatronCheckpoint, load_megatron_checkpoint_into
    from megatron_dgrpo.models.provider import build_gpt_model, initialize_parallel
    from megatron_dgrpo.parallel.launch import ensure_process_group_env

    world_size = ensure_process_group_env()
    parallel = ParallelConfig(tensor_parallel=args.tp or world_size)
    config = MegatronCheckpoint(args.teacher).config
    tokenizer = load_chat_tokenizer(args.tokenizer)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer {args.tokenizer} has {tokenizer.vocab_size} tokens, the "
                         f"teacher's vocabulary only {config.vocab_size}")
    refuse_existing(args.out)
    initialize_parallel(parallel)
    teacher = build_gpt_model(config, parallel)
    load_megatron_checkpoint_into(teacher, args.teacher)
    loader = LongBlocksLoader(LongBlocksConfig(paths=tuple(args.data), split="all",
                                               max_prompt_tokens=args.max_prompt_tokens), tokenizer)
    examples = itertools.islice(loader, args.limit) if args.limit else loader
    out = write_teacher_cache(args.out, teacher, config.vocab_size, tokenizer, examples, k=args.k,
                              batch_size=args.batch_size,
                              tp_group=ps.get_tensor_model_parallel_group())
    if out is not None:
        print(f"wrote {out} ({loader.summary.format()})")
    return 0
