"""Streaming loader for LongBlocks parquet shards (the public schema, see :mod:`.schema`).

Rows are read in record batches (``batch_rows`` at a time), never a whole file. Each row is
filtered, checked, and either skipped with a counted reason or turned into a
:class:`LongBlocksExample`:

1. rows may be *filtered*: by ``languages``, by ``sources`` (rows whose language / source is a
   string) and by split (train/validation assigned by a salted SHA-256 hash of the id, so the
   split never depends on file order);
2. bad rows are *skipped*: a required column missing from the file or null (``missing <col>``),
   an empty string (``empty <col>``), a value that is not a string (``wrong_type <col>``), a prompt
   longer than ``max_prompt_tokens`` (``over_length``) or shorter than ``min_prompt_tokens``
   (``under_length``); unreadable files are skipped and counted as files.

The end-of-pass summary (:class:`LoadSummary`, logged as a WARNING when rows were skipped) gives
rows and prompt tokens per reason; rows skipped before tokenizing (e.g. a null document) have an
unknown token count and are listed as such.

**Unusable rows at start-up.** Public LongBlocks ships 107,817 of its rows (55.6%, source
``Institutional-Books-1.0``) with ``document = null`` (rebuild them with ``dgrpo data
rebuild-documents``, :mod:`.rebuild`). :func:`scan` counts unusable rows per reason from the
files' columns and metadata without tokenizing, logs them, and refuses (``ValueError``) when more
than ``max_unusable_fraction`` of the rows not filtered out are unusable, unless
``allow_unusable``. The trainer calls it once at start-up.

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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .answers import AnswerFormat
from .chat import ChatTokenizer
from .schema import INSTITUTIONAL_BOOKS, REQUIRED_COLUMNS, RESPONSE_PREFIX, TEACHER_COLUMNS

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
    max_unusable_fraction: float = 0.05  # scan(): refuse above this share of unusable rows
    allow_unusable: bool = False  # scan(): only warn, whatever the share
    # What fixed-sequence objectives (SFT, KD) train on after the prompt: "reference" (the
    # answer column) or a response column, "response_<model>" (LongBlocks' teacher responses,
    # or one written by `dgrpo data teacher-responses`); rows without it are skipped
    # ("missing <column>"). Rewards always score against the reference answer.
    target: str = "reference"
    # The order training reads the rows in (data/mix.py): 0 = file order, epoch after epoch;
    # N >= 2 = each epoch shuffled through a buffer of N examples, seeded by the run's seed and
    # the epoch (N >= the rows kept: a uniformly random permutation). Evaluation ignores it.
    shuffle_buffer: int = 0

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
        if self.shuffle_buffer < 0 or self.shuffle_buffer == 1:
            raise ValueError(f"longblocks.shuffle_buffer must be 0 (file order) or >= 2 (a "
                             f"buffer of 1 cannot reorder), got {self.shuffle_buffer}")
        if not 0.0 <= self.max_unusable_fraction <= 1.0:
            raise ValueError("longblocks.max_unusable_fraction must be in [0, 1], got "
                             f"{self.max_unusable_fraction}")
        if self.target != "reference" and not self.target.startswith(RESPONSE_PREFIX):
            raise ValueError(f"data.target must be 'reference' or a response column "
                             f"'{RESPONSE_PREFIX}<model>' (e.g. {TEACHER_COLUMNS[0]}), got "
                             f"{self.target!r}")
        self.answer_format.validate()


def _listing(rows: Counter, tokens: Counter | None = None) -> str:
    """``reason: N rows (T tokens)`` per reason; reasons without a token count say so."""
    def tokens_of(reason: str) -> str:
        if tokens is None:
            return ""
        if reason in tokens:
            return f", {tokens[reason]:,} prompt tokens"
        return ", tokens unknown: no document" if reason == "missing document" else \
            ", tokens unknown: not tokenized"

    return "; ".join(f"{reason}: {n:,} rows{tokens_of(reason)}"
                     for reason, n in sorted(rows.items())) or "none"


@dataclass
class LoadSummary:
    """What happened to every row read: kept, skipped (bad) and filtered, by reason.

    ``skipped_tokens`` holds the prompt tokens of rows skipped after tokenizing (length limits);
    rows skipped before that have no token count.
    """

    kept: int = 0
    kept_tokens: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_tokens: Counter = field(default_factory=Counter)
    filtered: Counter = field(default_factory=Counter)
    unreadable_files: int = 0

    def format(self) -> str:
        skipped = sum(self.skipped.values())
        considered = self.kept + skipped
        share = f"{100 * skipped / considered:.1f}%" if considered else "0%"
        text = (f"kept {self.kept:,} rows ({self.kept_tokens:,} prompt tokens); skipped "
                f"{skipped:,} rows ({share} of the rows not filtered out: "
                f"{_listing(self.skipped, self.skipped_tokens)}); filtered "
                f"{sum(self.filtered.values()):,} rows ({_listing(self.filtered)})")
        return text + (f"; {self.unreadable_files} unreadable files" if self.unreadable_files else "")

    def to_dict(self) -> dict:
        return {"kept": self.kept, "kept_tokens": self.kept_tokens, "skipped": dict(self.skipped),
                "skipped_tokens": dict(self.skipped_tokens), "filtered": dict(self.filtered),
                "unreadable_files": self.unreadable_files}


@dataclass(frozen=True)
class LongBlocksExample:
    """A usable row. ``prompt_ids`` are the token ids of the chat-formatted ``user_message``
    (length ``num_prompt_tokens``; control tokens only where the template puts them);
    ``prompt`` is its text, for display."""

    id: str
    prompt: str
    prompt_ids: list[int]
    user_message: str
    reference_answer: str
    source: str
    language: str
    teacher_responses: dict[str, str]
    metadata: dict
    target_answer: str | None = None  # what SFT/KD train on (LongBlocksConfig.target); None: the reference

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
            summary.unreadable_files += 1


def filter_reason(config: LongBlocksConfig, row: dict) -> str | None:
    """Why ``row`` is left out by choice (language, source, split), or None; fields that are not
    strings are never filtered on. Reads only the row's ``id``, ``language`` and ``source``."""
    language, source, row_id = (row.get(c) for c in ("language", "source", "id"))
    if config.languages and isinstance(language, str) and language not in config.languages:
        return "language"
    if config.sources and isinstance(source, str) and source not in config.sources:
        return "source"
    if (config.split != "all" and isinstance(row_id, str)
            and split_of(row_id, config.validation_fraction, config.split_salt) != config.split):
        return "split"
    return None


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

    def example_of_row(self, row: dict) -> LongBlocksExample | tuple[str, int]:
        """The example, or (skip reason, prompt tokens)."""
        cfg = self.config
        instruction = cfg.answer_format.instruction() if cfg.answer_instruction else None
        user_message = build_user_message(row["document"], row["question"], instruction)
        prompt_ids = self.tokenizer.prompt_ids(user_message)
        if len(prompt_ids) > cfg.max_prompt_tokens:
            return "over_length", len(prompt_ids)
        if len(prompt_ids) < cfg.min_prompt_tokens:
            return "under_length", len(prompt_ids)
        teachers = {c: v for c, v in row.items()
                    if c.startswith(RESPONSE_PREFIX) and isinstance(v, str) and v.strip()}
        if cfg.target != "reference" and not isinstance(row.get(cfg.target), str):
            return f"missing {cfg.target}", len(prompt_ids)  # (an empty reply is a reply)
        known = set(REQUIRED_COLUMNS) | {c for c in row if c.startswith(RESPONSE_PREFIX)}
        return LongBlocksExample(
            id=row["id"],
            prompt=self.tokenizer.render_prompt(user_message),
            prompt_ids=prompt_ids,
            user_message=user_message,
            reference_answer=row["answer"],
            source=row["source"],
            language=row["language"],
            teacher_responses=teachers,
            metadata={k: v for k, v in row.items() if k not in known},
            target_answer=row["answer"] if cfg.target == "reference" else row[cfg.target],
        )

    def __iter__(self) -> Iterator[LongBlocksExample]:
        summary = self.summary
        for row in iter_parquet_rows(self.config.paths, self.config.batch_rows, summary):
            reason = filter_reason(self.config, row)
            if reason:
                summary.filtered[reason] += 1
                continue
            problem = row_problem(row)
            if problem:
                summary.skipped[problem] += 1
                continue
            example = self.example_of_row(row)
            if isinstance(example, tuple):
                summary.skipped[example[0]] += 1
                summary.skipped_tokens[example[0]] += example[1]
                continue
            summary.kept += 1
            summary.kept_tokens += example.num_prompt_tokens
            yield example
        level = logging.WARNING if summary.skipped or summary.unreadable_files else logging.INFO
        logger.log(level, "LongBlocks: %s", summary.format())


def require_usable_example(config: LongBlocksConfig, tokenizer: ChatTokenizer) -> None:
    """ValueError unless the loader keeps at least one row of ``config.paths`` (rows are
    tokenized until the first kept one: prompt lengths are what :func:`scan` cannot see),
    with the loader's count of why each row was left out."""
    loader = LongBlocksLoader(config, tokenizer)
    if next(iter(loader), None) is None:
        raise ValueError(f"the training data has no usable rows ({loader.summary.format()})")


# ---------------------------------------------------------------------- start-up scan


@dataclass
class ScanSummary:
    """Rows of the configured files, counted from their columns without tokenizing.

    ``unusable`` counts rows per reason (the loader's ``missing`` / ``wrong_type`` / ``empty``
    reasons, first failing column first), ``unusable_by_source`` the same per source.
    ``filtered`` rows are outside ``languages`` / ``sources`` and count neither way. Not
    checked here (the loader skips and counts them): whitespace-only documents and prompt
    lengths.
    """

    files: int = 0
    rows: int = 0
    filtered: int = 0
    unusable: Counter = field(default_factory=Counter)
    unusable_by_source: dict[str, Counter] = field(default_factory=dict)
    unreadable_files: list[str] = field(default_factory=list)

    @property
    def considered(self) -> int:
        return self.rows - self.filtered

    @property
    def unusable_rows(self) -> int:
        return sum(self.unusable.values())

    @property
    def unusable_fraction(self) -> float:
        return self.unusable_rows / self.considered if self.considered else 0.0

    def format(self) -> str:
        reasons = "; ".join(
            f"{reason}: {n:,} rows ("
            + ("tokens unknown: no document; " if reason == "missing document" else "")
            + ", ".join(f"{source}: {count:,}"
                        for source, count in self.unusable_by_source[reason].most_common()) + ")"
            for reason, n in self.unusable.most_common())
        text = (f"{self.rows:,} rows in {self.files} files, {self.filtered:,} filtered out; "
                f"unusable {self.unusable_rows:,} of {self.considered:,} "
                f"({100 * self.unusable_fraction:.1f}%){': ' + reasons if reasons else ''}")
        if self.unreadable_files:
            text += f"; unreadable files: {', '.join(self.unreadable_files)}"
        return text


_STRING_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)


def _is_string_type(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return any(check(kind) for check in _STRING_TYPES)


def column_null_mask(parquet: pq.ParquetFile, group: int, column: str) -> np.ndarray:
    """Null mask ``[rows]`` of ``column`` in row group ``group``: from the statistics when they
    decide it (no nulls / all null), else read in batches, keeping only the mask."""
    row_group = parquet.metadata.row_group(group)
    if row_group.num_rows == 0:
        return np.zeros(0, dtype=bool)
    for index in range(row_group.num_columns):
        stats = row_group.column(index).statistics
        if (row_group.column(index).path_in_schema == column and stats is not None
                and stats.has_null_count and stats.null_count in (0, row_group.num_rows)):
            return np.full(row_group.num_rows, stats.null_count > 0)
    return np.concatenate([batch.column(0).is_null().to_numpy(zero_copy_only=False)
                           for batch in parquet.iter_batches(row_groups=[group], columns=[column])])


def _column_problems(parquet: pq.ParquetFile, group: int, column: str,
                     small: pa.Table) -> list[tuple[np.ndarray, str]]:
    """(row mask, reason) pairs for one column of one row group, in the loader's order.

    ``small`` holds the row group's short columns (all but the document and teacher columns).
    """
    schema = parquet.schema_arrow
    optional = column in TEACHER_COLUMNS  # only a value that is not a string is a problem
    if column not in schema.names:
        return [] if optional else [(np.ones(small.num_rows, dtype=bool), f"missing {column}")]
    is_string = _is_string_type(schema.field(column).type)
    if optional:
        return [] if is_string else [(~column_null_mask(parquet, group, column), f"wrong_type {column}")]
    if column in small.column_names:
        values = small.column(column)
        null = values.is_null().to_numpy(zero_copy_only=False)
    else:
        values, null = None, column_null_mask(parquet, group, column)
    if not is_string:
        return [(null, f"missing {column}"), (~null, f"wrong_type {column}")]
    if values is None:  # documents: not read just to find whitespace-only ones
        return [(null, f"missing {column}")]
    empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0).fill_null(False)
    return [(null, f"missing {column}"), (empty.to_numpy(zero_copy_only=False), f"empty {column}")]


def _scan_row_group(parquet: pq.ParquetFile, group: int, config: LongBlocksConfig,
                    summary: ScanSummary) -> None:
    names = parquet.schema_arrow.names
    small = parquet.read_row_group(group, columns=[c for c in REQUIRED_COLUMNS
                                                   if c in names and c != "document"])
    reasons = np.full(small.num_rows, None, dtype=object)
    open_rows = np.ones(small.num_rows, dtype=bool)
    for column in (*REQUIRED_COLUMNS, *TEACHER_COLUMNS):
        for mask, reason in _column_problems(parquet, group, column, small):
            reasons[mask & open_rows] = reason
            open_rows &= ~mask

    def strings(column: str) -> list:
        values = small.column(column).to_pylist() if column in small.column_names else []
        return [v if isinstance(v, str) else None for v in values] or [None] * small.num_rows

    for reason, source, language in zip(reasons, strings("source"), strings("language")):
        summary.rows += 1
        if ((config.sources and source is not None and source not in config.sources)
                or (config.languages and language is not None and language not in config.languages)):
            summary.filtered += 1
        elif reason is not None:
            summary.unusable[reason] += 1
            summary.unusable_by_source.setdefault(reason, Counter())[source or "unknown source"] += 1


def scan(config: LongBlocksConfig) -> ScanSummary:
    """Count usable and unusable rows of ``config.paths`` (by reason and source), log them, and
    refuse to go on when too many are unusable.

    Reads parquet metadata and the small columns; documents only where the row-group statistics
    leave their nulls undecided. Logs one line (WARNING if any row is unusable or any file
    unreadable, else INFO). Raises ``ValueError`` when the unusable share of the rows not
    filtered out exceeds ``config.max_unusable_fraction``, or a file cannot be read, unless
    ``config.allow_unusable``.
    """
    config.validate()
    summary = ScanSummary()
    for path in parquet_files(config.paths):
        summary.files += 1
        try:
            parquet = pq.ParquetFile(path)
            for group in range(parquet.metadata.num_row_groups):
                _scan_row_group(parquet, group, config, summary)
        except (OSError, ValueError) as error:  # ArrowInvalid is a ValueError
            summary.unreadable_files.append(f"{path} ({error})")
    trouble = summary.unusable_rows or summary.unreadable_files
    logger.log(logging.WARNING if trouble else logging.INFO, "LongBlocks scan: %s", summary.format())
    if not summary.files or (not summary.rows and not summary.unreadable_files):
        raise ValueError(f"nothing to train on: {', '.join(map(str, config.paths))} hold "
                         f"{'no parquet files' if not summary.files else 'no rows'}")
    too_many = summary.unusable_fraction > config.max_unusable_fraction
    if (too_many or summary.unreadable_files) and not config.allow_unusable:
        why = (f"{100 * summary.unusable_fraction:.1f}% of the rows are unusable, more than "
               f"data.max_unusable_fraction={config.max_unusable_fraction}" if too_many
               else f"{len(summary.unreadable_files)} data files cannot be read")
        hint = (" Rows with a null document from Institutional-Books-1.0 can be rebuilt from a local "
                "copy of institutional/institutional-books-1.0 with `dgrpo data rebuild-documents`."
                if summary.unusable_by_source.get("missing document", {}).get(INSTITUTIONAL_BOOKS)
                else "")
        raise ValueError(f"refusing to train on {', '.join(map(str, config.paths))}: {why} "
                         f"({summary.format()}).{hint} Set data.allow_unusable=true to train on "
                         "the usable rows anyway.")
    return summary
