"""Streaming loader for LongBlocks parquet shards (the public schema, see :mod:`.schema`).

Rows are read in record batches (``batch_rows`` at a time), never a whole file. Each row is checked
and either skipped with a counted reason or turned into a :class:`LongBlocksExample`:

1. bad rows are *skipped*: a required column missing from the file or null (``missing <col>``),
   an empty string (``empty <col>``), a value that is not a string (``wrong_type <col>``), a prompt
   longer than ``max_prompt_tokens`` (``over_length``) or shorter than ``min_prompt_tokens``
   (``under_length``); unreadable files are skipped as ``unreadable_file``;
2. good rows may be *filtered*: by ``languages``, by ``sources`` and by split (train/validation
   assigned by a salted SHA-256 hash of the id, so the split never depends on file order).

The prompt is the chat-formatted user message ``document + "\\n\\n" + question`` (plus the
answer-format instruction of :mod:`.answers`), rendered by a :class:`~.chat.ChatTokenizer`.
Teacher responses are optional: null or empty ones are left out of ``teacher_responses``.
Columns beyond the public ones (e.g. synthetic task metadata) are kept in ``metadata``.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from .answers import AnswerFormat
from .chat import ChatTokenizer
from .schema import REQUIRED_COLUMNS, TEACHER_COLUMNS

logger = logging.getLogger(__name__)
SPLITS = ("train", "validation", "all")


@dataclass
class LongBlocksConfig:
    """Where to read and what to keep. Token limits count prompt tokens (chat template included)."""

    paths: tuple[str, ...] = ()
    split: str = "train"
    validation_fraction: float = 0.01
    split_salt: str = "longblocks"
    languages: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    min_prompt_tokens: int = 0
    max_prompt_tokens: int = 32768
    batch_rows: int = 64
    answer_instruction: bool = True
    answer_format: AnswerFormat = field(default_factory=AnswerFormat)

    def validate(self) -> None:
        if not self.paths:
            raise ValueError("longblocks.paths must name at least one parquet file or directory")
        if self.split not in SPLITS:
            raise ValueError(f"longblocks.split must be one of {SPLITS}, got {self.split!r}")
        if not 0.0 <= self.validation_fraction <= 1.0:
            raise ValueError(
                f"longblocks.validation_fraction must be in [0, 1], got {self.validation_fraction}"
            )
        if self.min_prompt_tokens < 0 or self.max_prompt_tokens <= self.min_prompt_tokens:
            raise ValueError(
                f"longblocks.max_prompt_tokens ({self.max_prompt_tokens}) must exceed "
                f"min_prompt_tokens ({self.min_prompt_tokens}) >= 0"
            )
        if self.batch_rows <= 0:
            raise ValueError(f"longblocks.batch_rows must be positive, got {self.batch_rows}")
        self.answer_format.validate()


@dataclass
class LoadSummary:
    """Counts of what happened to every row read: kept, skipped (bad) and filtered (by reason)."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    filtered: Counter = field(default_factory=Counter)

    def format(self) -> str:
        def listing(counter: Counter) -> str:
            return ", ".join(f"{reason}: {n}" for reason, n in sorted(counter.items())) or "none"

        return (
            f"kept {self.kept}; skipped {sum(self.skipped.values())} ({listing(self.skipped)}); "
            f"filtered {sum(self.filtered.values())} ({listing(self.filtered)})"
        )


@dataclass(frozen=True)
class LongBlocksExample:
    """A usable row. ``prompt_ids`` are the token ids of ``prompt`` (length ``num_prompt_tokens``)."""

    id: str
    prompt: str
    prompt_ids: list[int]
    user_message: str
    reference_answer: str
    source: str
    language: str
    teacher_responses: dict[str, str]
    metadata: dict

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)


def split_of(row_id: str, validation_fraction: float, salt: str = "longblocks") -> str:
    """``"validation"`` for a stable ``validation_fraction`` of ids, else ``"train"``."""
    digest = hashlib.sha256(f"{salt}:{row_id}".encode()).digest()
    return "validation" if int.from_bytes(digest[:8], "big") / 2**64 < validation_fraction else "train"


def build_user_message(document: str, question: str, instruction: str | None) -> str:
    """The user turn: document, blank line, question (and the answer-format instruction)."""
    message = f"{document}\n\n{question}"
    return f"{message}\n\n{instruction}" if instruction else message


def parquet_files(paths: tuple[str, ...] | list[str]) -> list[Path]:
    """Parquet files named by ``paths`` (files, or directories searched recursively), sorted."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(path.rglob("*.parquet")))
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"data path {raw!r} does not exist")
    return files


def iter_parquet_rows(paths, batch_rows: int, summary: LoadSummary) -> Iterator[dict]:
    """Rows as dicts, streamed batch by batch; columns absent from a file read as missing (None)."""
    for path in parquet_files(paths):
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
                yield from batch.to_pylist()
        except (OSError, ValueError) as error:  # pyarrow raises ArrowInvalid (a ValueError) / OSError
            logger.warning("skipping unreadable parquet file %s: %s", path, error)
            summary.skipped["unreadable_file"] += 1


def row_problem(row: dict) -> str | None:
    """Why ``row`` is unusable (a skip reason), or None if its fields are well-formed."""
    for column in REQUIRED_COLUMNS:
        value = row.get(column)
        if value is None:
            return f"missing {column}"
        if not isinstance(value, str):
            return f"wrong_type {column}"
        if not value.strip():
            return f"empty {column}"
    for column in TEACHER_COLUMNS:
        value = row.get(column)
        if value is not None and not isinstance(value, str):
            return f"wrong_type {column}"
    return None


class LongBlocksLoader:
    """Iterate :class:`LongBlocksExample` s; ``summary`` accumulates counts across iterations."""

    def __init__(self, config: LongBlocksConfig, tokenizer: ChatTokenizer) -> None:
        config.validate()
        self.config = config
        self.tokenizer = tokenizer
        self.summary = LoadSummary()

    def _filter_reason(self, row: dict) -> str | None:
        cfg = self.config
        if cfg.languages and row["language"] not in cfg.languages:
            return "language"
        if cfg.sources and row["source"] not in cfg.sources:
            return "source"
        if cfg.split != "all" and split_of(row["id"], cfg.validation_fraction, cfg.split_salt) != cfg.split:
            return "split"
        return None

    def _example(self, row: dict) -> LongBlocksExample | str:
        cfg = self.config
        instruction = cfg.answer_format.instruction() if cfg.answer_instruction else None
        user_message = build_user_message(row["document"], row["question"], instruction)
        prompt = self.tokenizer.render_prompt(user_message)
        prompt_ids = self.tokenizer.encode(prompt)
        if len(prompt_ids) > cfg.max_prompt_tokens:
            return "over_length"
        if len(prompt_ids) < cfg.min_prompt_tokens:
            return "under_length"
        teachers = {c: row[c] for c in TEACHER_COLUMNS if isinstance(row.get(c), str) and row[c].strip()}
        known = set(REQUIRED_COLUMNS) | set(TEACHER_COLUMNS)
        return LongBlocksExample(
            id=row["id"],
            prompt=prompt,
            prompt_ids=prompt_ids,
            user_message=user_message,
            reference_answer=row["answer"],
            source=row["source"],
            language=row["language"],
            teacher_responses=teachers,
            metadata={k: v for k, v in row.items() if k not in known},
        )

    def __iter__(self) -> Iterator[LongBlocksExample]:
        for row in iter_parquet_rows(self.config.paths, self.config.batch_rows, self.summary):
            problem = row_problem(row)
            if problem:
                self.summary.skipped[problem] += 1
                continue
            reason = self._filter_reason(row)
            if reason:
                self.summary.filtered[reason] += 1
                continue
            example = self._example(row)
            if isinstance(example, str):
                self.summary.skipped[example] += 1
                continue
            self.summary.kept += 1
            yield example
        logger.info("LongBlocks: %s", self.summary.format())
