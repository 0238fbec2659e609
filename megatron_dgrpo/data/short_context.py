"""A short-context set for retention checks (GSM8K-, MMLU-style items the user converts), plain JSONL.

One object per line: ``question`` (str), ``answer`` (str), ``metric`` (a reward name of
:mod:`.rewards`, e.g. ``numeric_match`` for GSM8K, ``exact_match`` for a letter, ``token_f1``), and
optionally ``id`` (str; default ``<file stem>-<line>``), ``context`` (str, placed before the
question) and ``task`` (str; the table row, default the file's stem). The prompt is the user
message ``[context + "\\n\\n"] question`` plus the answer-format instruction of :mod:`.answers`,
chat-formatted; the response's answer is extracted by that convention and scored by the row's
metric. Every line is checked before anything is generated; a problem is a ValueError naming the
file, line and field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .answers import AnswerFormat, extract_answer
from .chat import ChatTokenizer
from .evaluate import NO_DEPTH, EvalItem, length_bucket_of
from .records import field, read_records
from .rewards import REWARDS


@dataclass(frozen=True)
class ShortItem(EvalItem):
    """An item scored by its own ``metric`` (a reward name)."""

    metric: str = "exact_match"


def load_short_context(paths: list[str] | tuple[str, ...], tokenizer: ChatTokenizer,
                       answer_format: AnswerFormat | None = None) -> list[ShortItem]:
    """Every item of the files, checked and prompted (see the module docstring)."""
    fmt = answer_format or AnswerFormat()
    items: list[ShortItem] = []
    for path in paths:
        stem = Path(path).stem
        for number, (where, record) in enumerate(read_records(path), start=1):
            metric = field(record, "metric", str, where)
            if metric not in REWARDS:
                raise ValueError(f"{where}: field 'metric' = {metric!r} is not a reward; known: "
                                 f"{', '.join(sorted(REWARDS))}")
            question = field(record, "question", str, where)
            answer = field(record, "answer", str, where)
            context = field(record, "context", str, where, optional=True)
            message = f"{context}\n\n{question}" if context else question
            prompt_ids = tuple(tokenizer.prompt_ids(f"{message}\n\n{fmt.instruction()}"))
            items.append(ShortItem(
                id=field(record, "id", str, where, optional=True) or f"{stem}-{number}",
                prompt_ids=prompt_ids, reference=answer, task=metric,
                family=field(record, "task", str, where, optional=True) or stem,
                length_bucket=length_bucket_of(len(prompt_ids)), depth=NO_DEPTH, metric=metric))
    return items


def short_context_scorer(answer_format: AnswerFormat | None = None):
    """``score(item, response)``: the item's metric on the extracted answer."""
    fmt = answer_format or AnswerFormat()
    return lambda item, response: REWARDS[item.metric](extract_answer(response, fmt), item.reference)
