"""``dgrpo data prepare``: LongBlocks parquet -> filtered, tokenized parquet shards.

Output columns: id, source, language, prompt_ids (list<int32>, the chat-formatted prompt),
answer_ids (the reference answer as an assistant turn) and one ``<teacher column>_ids`` list per
teacher (null when that teacher's response is absent). ``summary.json`` holds the loader's counts
of kept, skipped (bad) and filtered rows, and their prompt tokens where known.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .chat import ChatTokenizer
from .longblocks import LoadSummary, LongBlocksConfig, LongBlocksExample, LongBlocksLoader
from ..outputs import atomic_output_dir
from .schema import TEACHER_COLUMNS

PREPARED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("language", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("answer_ids", pa.list_(pa.int32())),
    ]
    + [(f"{name}_ids", pa.list_(pa.int32())) for name in TEACHER_COLUMNS]
)


def response_ids(example: LongBlocksExample, tokenizer: ChatTokenizer, response: str) -> list[int]:
    """Token ids of ``response`` as the assistant turn after ``example.prompt`` (end markers included).

    ``example.prompt_ids + response_ids(...)`` is the tokenized conversation, ready for
    :class:`~.pack.Sample` (SFT on the reference answer or on a teacher response).
    """
    return tokenizer.response_ids(example.user_message, response)


def tokenized_row(example: LongBlocksExample, tokenizer: ChatTokenizer) -> dict:
    """One output row: the prompt's ids and each response rendered as an assistant turn, tokenized."""
    row = {
        "id": example.id,
        "source": example.source,
        "language": example.language,
        "prompt_ids": example.prompt_ids,
        "answer_ids": response_ids(example, tokenizer, example.reference_answer),
    }
    for name in TEACHER_COLUMNS:
        response = example.teacher_responses.get(name)
        row[f"{name}_ids"] = response_ids(example, tokenizer, response) if response is not None else None
    return row


def prepare_longblocks(
    config: LongBlocksConfig, tokenizer: ChatTokenizer, out_dir: str | Path, shard_size: int = 1000
) -> LoadSummary:
    """Write ``out_dir/part-NNNNN.parquet`` shards and ``summary.json``; returns the load summary."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    loader = LongBlocksLoader(config, tokenizer)
    with atomic_output_dir(out_dir) as tmp:
        rows: list[dict] = []
        shard = 0

        def flush() -> None:
            nonlocal rows, shard
            pq.write_table(
                pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA), tmp / f"part-{shard:05d}.parquet"
            )
            rows, shard = [], shard + 1

        for example in loader:
            rows.append(tokenized_row(example, tokenizer))
            if len(rows) == shard_size:
                flush()
        if rows or shard == 0:
            flush()
        summary = loader.summary
        (tmp / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
    return loader.summary
