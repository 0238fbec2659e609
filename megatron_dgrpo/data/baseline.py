"""The no-context baseline: what answering from the question alone scores.

Fit on a training set, it remembers the most frequent reference answer per key, from the finest
key to the coarsest:

1. (family, task, question template): synthetic rows record their template, the question with
   its entity slots abstracted (``Who is the {relation} of {person}?``);
2. (family, task): for templates the fit set never showed;
3. (family,): public LongBlocks rows (no task, no template) and unseen tasks.

A held-out item is answered with the answer of its finest key the fit set has seen (an empty
answer if none), and scored by the evaluation's own rewards (:class:`~.rewards.RewardConfig`).
Without a separate fit set, the evaluated items themselves can be fit and each answered
leave-one-out (from the other items' answers), which keeps a small set from scoring its own
answers. Ties between equally frequent answers go to the one seen first.

A score well above zero means part of the task can be solved without the document; the synthetic
generator is built so that this stays near 1 / (number of equally likely answers) per task.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from .evaluate import BaselineScores, EvalItem, EvalTable, ScoredItem, Scorer, family_of
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


@dataclass(frozen=True)
class Mode:
    """A key's most frequent answer, and the best other one (for leaving one example out).

    Ties go to the answer seen first: ``answer`` is the first seen of those with ``count``
    occurrences, ``runner_up`` the first seen of the most frequent among the others, and
    ``answer_first`` says whether ``answer`` was seen before ``runner_up``.
    """

    answer: str
    count: int
    runner_up: str | None
    runner_up_count: int
    answer_first: bool

    @classmethod
    def of(cls, counter: Counter) -> Mode:
        ranked = counter.most_common()  # equal counts stay in first-seen order
        answer, count = ranked[0]
        if len(ranked) == 1:
            return cls(answer, count, None, 0, True)
        runner_up, runner_up_count = ranked[1]
        seen = list(counter)
        return cls(answer, count, runner_up, runner_up_count, seen.index(answer) < seen.index(runner_up))

    def without(self, reference: str) -> str | None:
        """The most frequent answer once one occurrence of ``reference`` is left out (None: none left)."""
        if reference != self.answer:
            return self.answer
        left = self.count - 1
        if left > self.runner_up_count or (left == self.runner_up_count and left and self.answer_first):
            return self.answer
        return self.runner_up


class NoContextBaseline:
    """Most frequent training answers per key; build it with :meth:`fit`."""

    def __init__(self, modes: dict[Key, Mode], fit_on: str, num_examples: int) -> None:
        self.modes = modes
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
        modes = {key: Mode.of(counter) for key, counter in counts.items()}
        return cls(modes, f"{fit_on} ({num_examples} examples)", num_examples)

    def answer(self, example: Keyed, leave_out: bool = False) -> str:
        """The answer of ``example``'s finest key seen in fitting, or ``""``.

        ``leave_out``: ``example`` was among the fitted ones; answer as if it had not been
        (leave-one-out), backing off past keys that only it filled.
        """
        for key in keys_of(example):
            mode = self.modes.get(key)
            answer = mode and (mode.without(example.reference) if leave_out else mode.answer)
            if answer is not None:
                return answer
        return ""

    def score(
        self, items: Iterable[EvalItem], scorer: RewardConfig | Scorer, leave_out: bool = False
    ) -> BaselineScores:
        """Answer every item from its question's keys alone and score it like a model answer
        (with the evaluation's rewards, or its suite's scorer ``score(item, response)``;
        ``leave_out``: the items are the fitted ones, each answered leave-one-out)."""
        scored = []
        for item in items:
            answer = self.answer(item, leave_out)
            score = (scorer.score_answer(answer, item.reference, item.task)
                     if isinstance(scorer, RewardConfig) else scorer(item, answer))
            scored.append(ScoredItem(item, answer, score))
        fit_on = f"{self.fit_on}, leave-one-out" if leave_out else self.fit_on
        return BaselineScores(EvalTable(scored), fit_on)


def task_markdown(scored: list[ScoredItem]) -> str:
    """A Markdown table of items and mean score x 100 per task (per family for rows without one)."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for s in scored:
        entry = sums[s.item.task or s.item.family]
        entry[0] += s.score
        entry[1] += 1
    lines = ["| task | items | score |", "|---|---|---|"]
    lines += [f"| {task} | {n} | {100 * total / n:.1f} |" for task, (total, n) in sorted(sums.items())]
    return "\n".join(lines) + "\n"
