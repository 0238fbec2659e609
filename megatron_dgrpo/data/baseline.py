"""The no-context baseline: what answering from the question alone scores.

Fit on a training set, it remembers the most frequent reference answer per key, from the finest
key to the coarsest:

1. (family, task, question template): synthetic rows record their template, the question with
   its entity slots abstracted (``Who is the {relation} of {person}?``);
2. (family, task): for templates the fit set never showed;
3. (family,): public LongBlocks rows (no task, no template) and unseen tasks.

A held-out item is answered with the answer of its finest key the fit set has seen (an empty
answer if none), and scored by the evaluation's own rewards (:class:`~.rewards.RewardConfig`).
A score well above zero means part of the task can be solved without the document; the synthetic
generator is built so that this stays near 1 / (number of equally likely answers) per task.
Ties between equally frequent answers go to the one seen first.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from .evaluate import BaselineScores, EvalItem, EvalTable, ScoredItem, family_of
from .longblocks import LoadSummary, iter_parquet_rows, row_problem
from .rewards import RewardConfig

Key = tuple[str | None, ...]


class Keyed(Protocol):
    """What fitting needs of an example: its keys and reference answer (e.g. an EvalItem)."""

    family: str
    task: str | None
    template: str | None
    reference: str


@dataclass(frozen=True)
class FitRow:
    """The keys and reference answer of one training row."""

    family: str
    task: str | None
    template: str | None
    reference: str


def keys_of(example: Keyed) -> list[Key]:
    """The example's keys, finest first (see the module docstring)."""
    family, task = example.family, example.task
    return [(family, task, example.template), (family, task), (family,)]


def read_fit_rows(paths: Iterable[str]) -> Iterator[FitRow]:
    """The rows of parquet files or directories as :class:`FitRow` s, without tokenizing anything.

    Rows the LongBlocks loader would skip as malformed (missing or empty fields) are skipped.
    """
    for row in iter_parquet_rows(tuple(paths), batch_rows=1024, summary=LoadSummary()):
        if row_problem(row) is None:
            yield FitRow(family_of(row, row["source"]), row.get("task"), row.get("question_template"),
                         row["answer"])


class NoContextBaseline:
    """Most frequent training answers per key; build it with :meth:`fit`."""

    def __init__(self, answers: dict[Key, str], fit_on: str, num_examples: int) -> None:
        self.answers = answers
        self.fit_on = fit_on
        self.num_examples = num_examples

    @classmethod
    def fit(cls, examples: Iterable[Keyed], fit_on: str) -> NoContextBaseline:
        """Count reference answers per key over ``examples``; ``fit_on`` names them in reports."""
        counts: dict[Key, Counter] = defaultdict(Counter)
        num_examples = 0
        for example in examples:
            num_examples += 1
            for key in keys_of(example):
                counts[key][example.reference] += 1
        if num_examples == 0:
            raise ValueError(f"no-context baseline: no usable examples in {fit_on}")
        answers = {key: counter.most_common(1)[0][0] for key, counter in counts.items()}
        return cls(answers, f"{fit_on} ({num_examples} examples)", num_examples)

    def answer(self, example: Keyed) -> str:
        """The answer for ``example``'s finest key seen in fitting, or ``""``."""
        return next((self.answers[key] for key in keys_of(example) if key in self.answers), "")

    def score(self, items: Iterable[EvalItem], rewards: RewardConfig) -> BaselineScores:
        """Answer every item from its question's keys alone and score it like a model answer."""
        scored = []
        for item in items:
            answer = self.answer(item)
            scored.append(ScoredItem(item, answer, rewards.score_answer(answer, item.reference, item.task)))
        return BaselineScores(EvalTable(scored), self.fit_on)
