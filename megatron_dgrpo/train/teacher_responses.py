"""``dgrpo data teacher-responses``: a teacher answers every prompt once; its responses become
a column that SFT and KD can train on (``data.target: response_<name>``).

    dgrpo data teacher-responses --teacher ckpt/teacher --tokenizer tok/ --data data/train \\
        --out data/train-with-teacher [--column response_teacher] [--max-new-tokens 64]

This is the paper's off-policy distillation baseline made runnable anywhere: SFT on a
stronger model's responses (LongBlocks ships three such columns; a CPU run has no such
model, so its own teacher writes them), and KD on the teacher's distribution over those
sequences. The output mirrors ``--data`` (same relative paths and columns) plus the new
column: the teacher's greedy reply (``--temperature 0``, default) up to its end-of-turn
marker, null on rows the loader cannot use. One process (TP=1, embedded engine); written
atomically, an existing ``--out`` is refused. ``teacher_responses.json`` records how.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_teacher_responses_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, help="teacher Megatron checkpoint directory")
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer dir or sentencepiece .model")
    parser.add_argument("--data", required=True, help="directory of LongBlocks-schema parquet files")
    parser.add_argument("--out", required=True, help="new output directory")
    parser.add_argument("--column", default="response_teacher",
                        help="name of the new column (must start with response_)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-prompt-tokens", type=int, default=131072)


def run_teacher_responses(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from rich.progress import Progress

    from megatron_dgrpo.data.chat import IM_END, load_chat_tokenizer, reply_text
    from megatron_dgrpo.data.longblocks import (
        LongBlocksConfig,
        LongBlocksLoader,
        parquet_files,
        row_problem,
    )
    from megatron_dgrpo.data.schema import RESPONSE_PREFIX
    from megatron_dgrpo.models.config import ParallelConfig
    from megatron_dgrpo.models.loading import checkpoint_model
    from megatron_dgrpo.models.provider import initialize_parallel
    from megatron_dgrpo.outputs import atomic_output_dir, refuse_existing
    from megatron_dgrpo.parallel.launch import ensure_process_group_env
    from megatron_dgrpo.rollout.embedded import EmbeddedEngine
    from megatron_dgrpo.rollout.engine import SamplingParams

    if not args.column.startswith(RESPONSE_PREFIX) or args.column == RESPONSE_PREFIX:
        raise ValueError(f"--column must be '{RESPONSE_PREFIX}<name>', got {args.column!r}")
    data = Path(args.data)
    if not data.is_dir():
        raise ValueError(f"--data {args.data!r} is not a directory")
    files = parquet_files([str(data)])
    if not files:
        raise ValueError(f"--data {args.data!r} holds no parquet files")
    refuse_existing(args.out)
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                            stop_strings=[IM_END], seed=args.seed)
    params.validate()
    tokenizer = load_chat_tokenizer(args.tokenizer)
    if ensure_process_group_env() != 1:
        raise ValueError("dgrpo data teacher-responses runs in one process; launch it "
                         "without torchrun")
    initialize_parallel(ParallelConfig())
    teacher, config = checkpoint_model(args.teacher, ParallelConfig(), tokenizer)
    engine = EmbeddedEngine(teacher, config.vocab_size, decode=tokenizer.decode)
    loader = LongBlocksLoader(LongBlocksConfig(paths=(str(data),), split="all",
                                               max_prompt_tokens=args.max_prompt_tokens),
                              tokenizer)
    written = skipped = 0
    with atomic_output_dir(args.out) as tmp, Progress() as progress:
        for path in files:
            table = pq.read_table(path)
            if args.column in table.column_names:
                raise ValueError(f"{path} already has a column {args.column!r}")
            rows = table.to_pylist()
            prompts = {}
            for index, row in enumerate(rows):
                example = None if row_problem(row) else loader.example_of_row(row)
                if example is not None and not isinstance(example, tuple):
                    prompts[index] = example.prompt_ids
            responses: list[str | None] = [None] * len(rows)
            order = sorted(prompts)
            task = progress.add_task(f"{path.name}", total=len(order))
            for start in range(0, len(order), args.batch_size):
                chosen = order[start:start + args.batch_size]
                batch = engine.generate([prompts[i] for i in chosen], params)
                for i, rollout in zip(chosen, batch.rollouts):
                    responses[i] = reply_text(rollout.text)
                progress.advance(task, len(chosen))
            written += len(order)
            skipped += len(rows) - len(order)
            target = tmp / path.relative_to(data)
            target.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table.append_column(args.column, pa.array(responses, pa.string())),
                           target)
        (tmp / "teacher_responses.json").write_text(json.dumps({
            "teacher": str(args.teacher), "column": args.column, "responses": written,
            "rows_without_prompt": skipped, "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "seed": args.seed}, indent=2) + "\n")
    print(f"wrote {args.out}: {written} responses in column {args.column} "
          f"({skipped} unusable rows left null)")
    return 0
