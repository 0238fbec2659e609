"""Outcome rewards: a registry of answer-vs-reference scores, each a float in [0, 1].

========================= ==========================================================================
name                      score of an extracted answer against the reference
========================= ==========================================================================
exact_match               1 if the normalized strings are equal (normalization below), else 0
token_f1                  F1 of the normalized token multisets (SQuAD-style)
set_f1                    F1 of the sets of normalized items; items are split on ``;`` ``,`` newlines,
                          ``&`` and the word "and"
numeric_match             1 if the first number of each side agrees (relative tolerance 1e-6); commas are
                          thousands separators ("1,234"), units and currency signs are ignored, the words
                          zero..twenty count; a reference with no number falls back to exact_match
abstention                1 if the answer abstains ("unanswerable", "not mentioned", "does not say", ...)
                          exactly when the reference does, else 0
abstention_or_exact_match abstention when the reference abstains, else exact_match (an abstaining answer
                          to an answerable question scores 0); the reward of questions that may or may
                          not be answerable
rouge_l                   ROUGE-L F-measure (``rouge-score`` package) over the normalized tokens
ruler_match_all           RULER's ``string_match_all``: the fraction of the references contained in the
                          answer, case-insensitive (no other normalization)
ruler_match_part          RULER's ``string_match_part``: 1 if any reference is contained in the answer,
                          case-insensitive, else 0
========================= ==========================================================================

**Several references.** A reference holding several acceptable or required answers lists them one
per line (:func:`join_references` / :func:`split_references`); the ``ruler_*`` rewards read it so.
The other rewards treat the reference as one text.

Normalization: Unicode NFKC, case-folded, punctuation and symbols become spaces, the English
articles a/an/the are dropped, whitespace collapses. Tokens are whitespace-separated words, except
that CJK ideographs, kana and hangul count one token per character. Two empty sides score 1, one
empty side scores 0. :class:`RewardConfig` picks a reward per task and applies the answer-extraction
convention of :mod:`.answers` to the response first.
"""

from __future__ import annotations

import logging
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from rouge_score import rouge_scorer

from .answers import AnswerFormat, extract_answer

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, str], float]
REWARDS: dict[str, RewardFn] = {}

DEFAULT_TASK_REWARDS = {
    "multihop": "exact_match",
    "counterfactual": "exact_match",
    "unanswerable": "abstention_or_exact_match",
    "list_items": "set_f1",
    "count_items": "numeric_match",
    "sum_values": "numeric_match",
    "section_lookup": "numeric_match",
    "event_order": "exact_match",
}
# RULER's tasks (megatron_dgrpo.data.ruler) and their metrics: QA takes any reference, the rest all
RULER_TASK_REWARDS = {
    **{name: "ruler_match_all" for name in (
        "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
        "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")},
    "qa_1": "ruler_match_part",
    "qa_2": "ruler_match_part",
}
DEFAULT_TASK_REWARDS.update(RULER_TASK_REWARDS)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_TOKEN = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_NUMBER = re.compile(r"(?<![\d.])[-+]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)?(?:\.\d+)?")
_NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_ITEM_SPLIT = re.compile(r"[;,\n&]|\band\b", re.IGNORECASE)
_ABSTENTIONS = (
    "unanswerable",
    "cannot be answered",
    "can not be answered",
    "cannot answer",
    "not answerable",
    "no answer",
    "not mentioned",
    "not stated",
    "not specified",
    "not provided",
    "not given",
    "does not say",
    "does not mention",
    "does not state",
    "does not specify",
    "does not contain",
    "does not provide",
    "doesn t say",
    "doesn t mention",
    "doesn t state",
    "doesn t specify",
    "doesn t contain",
    "doesn t provide",
    "no information",
    "insufficient information",
    "not enough information",
    "unknown",
    "cannot determine",
    "cannot be determined",
    "not in document",
    "i don t know",
    "i do not know",
)


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding a ``(answer, reference) -> float in [0, 1]`` function to :data:`REWARDS`."""

    def add(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return add


def normalize_text(text: str) -> str:
    """The normalization described in the module docstring."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return " ".join(_ARTICLES.sub(" ", text).split())


def text_tokens(text: str) -> list[str]:
    """Normalized tokens of ``text``."""
    return _TOKEN.findall(normalize_text(text))


def _f1(common: int, predicted: int, expected: int) -> float:
    if predicted == 0 and expected == 0:
        return 1.0
    if common == 0:
        return 0.0
    precision, recall = common / predicted, common / expected
    return 2 * precision * recall / (precision + recall)


@register_reward("exact_match")
def exact_match(answer: str, reference: str) -> float:
    return float(normalize_text(answer) == normalize_text(reference))


@register_reward("token_f1")
def token_f1(answer: str, reference: str) -> float:
    predicted, expected = Counter(text_tokens(answer)), Counter(text_tokens(reference))
    common = sum((predicted & expected).values())
    return _f1(common, sum(predicted.values()), sum(expected.values()))


def split_items(text: str) -> set[str]:
    """The set of normalized, non-empty items of a list answer."""
    return {item for item in (normalize_text(part) for part in _ITEM_SPLIT.split(text)) if item}


@register_reward("set_f1")
def set_f1(answer: str, reference: str) -> float:
    predicted, expected = split_items(answer), split_items(reference)
    return _f1(len(predicted & expected), len(predicted), len(expected))


def first_number(text: str) -> float | None:
    """The first number in ``text`` (see numeric_match for the rules), or None."""
    text = unicodedata.normalize("NFKC", text)
    for match in _NUMBER.finditer(text):
        digits = match.group().replace(",", "")
        if any(ch.isdigit() for ch in digits):
            return float(digits)
    for word in re.findall(r"[a-z]+", text.casefold()):
        if word in _NUMBER_WORDS:
            return float(_NUMBER_WORDS[word])
    return None


@register_reward("numeric_match")
def numeric_match(answer: str, reference: str) -> float:
    expected = first_number(reference)
    if expected is None:
        return exact_match(answer, reference)
    predicted = first_number(answer)
    if predicted is None:
        return 0.0
    return float(abs(predicted - expected) <= 1e-6 * max(1.0, abs(expected)))


def is_abstention(text: str) -> bool:
    """Whether ``text`` declines to answer (phrases listed in ``_ABSTENTIONS``)."""
    normalized = f" {normalize_text(text)} "
    return any(f" {phrase} " in normalized for phrase in _ABSTENTIONS)


@register_reward("abstention")
def abstention(answer: str, reference: str) -> float:
    return float(is_abstention(answer) == is_abstention(reference))


@register_reward("abstention_or_exact_match")
def abstention_or_exact_match(answer: str, reference: str) -> float:
    if is_abstention(reference):
        return float(is_abstention(answer))
    return exact_match(answer, reference)


class _RougeTokenizer:
    """Adapter giving rouge-score our Unicode-aware tokens (its own drops non-ASCII text)."""

    def tokenize(self, text: str) -> list[str]:
        return text_tokens(text)


_ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_RougeTokenizer())


@register_reward("rouge_l")
def rouge_l(answer: str, reference: str) -> float:
    if not text_tokens(answer) and not text_tokens(reference):
        return 1.0
    return float(_ROUGE.score(reference, answer)["rougeL"].fmeasure)


def join_references(references: list[str] | tuple[str, ...]) -> str:
    """One reference string listing ``references`` one per line (each non-empty, without newlines)."""
    for reference in references:
        if not reference.strip() or "\n" in reference:
            raise ValueError(f"a reference must be non-empty and on one line, got {reference!r}")
    if not references:
        raise ValueError("at least one reference is needed")
    return "\n".join(references)


def split_references(reference: str) -> list[str]:
    """The references listed in ``reference`` (one per non-empty line, stripped)."""
    return [line.strip() for line in reference.splitlines() if line.strip()]


def _contained(answer: str, references: list[str]) -> list[bool]:
    answer = answer.lower()
    return [r.lower() in answer for r in references]


@register_reward("ruler_match_all")
def ruler_match_all(answer: str, reference: str) -> float:
    found = _contained(answer, split_references(reference))
    return sum(found) / len(found) if found else 0.0


@register_reward("ruler_match_part")
def ruler_match_part(answer: str, reference: str) -> float:
    return float(any(_contained(answer, split_references(reference))))


@dataclass
class RewardConfig:
    """Which reward scores which task, and how answers are extracted from responses.

    ``per_task`` maps task names (the ``task`` column of synthetic data) to reward names;
    tasks not listed (e.g. public LongBlocks rows, whose task is unknown) use ``default``.
    """

    per_task: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TASK_REWARDS))
    default: str = "token_f1"
    answer_format: AnswerFormat = field(default_factory=AnswerFormat)
    # Responses cut at sampling.max_new_tokens: "none" (scored like any other), "mask" (their
    # tokens leave the loss: DAPO's overlong filtering; they still count in their group's
    # reward statistics), "penalty" (DAPO's soft overlong punishment added to the reward,
    # see :func:`overlong_penalty`, times ``overlong_weight``).
    overlong: Literal["none", "mask", "penalty"] = "none"
    overlong_buffer: int = 0  # penalty: the last L_cache tokens of the budget where it ramps
    overlong_weight: float = 1.0

    def validate(self) -> None:
        if self.overlong == "penalty" and (self.overlong_buffer < 1 or self.overlong_weight <= 0):
            raise ValueError("rewards.overlong=penalty needs rewards.overlong_buffer >= 1 "
                             f"(got {self.overlong_buffer}) and overlong_weight > 0 "
                             f"(got {self.overlong_weight})")
        for task, name in {**self.per_task, "<default>": self.default}.items():
            if name not in REWARDS:
                option = "rewards.default" if task == "<default>" else f"rewards.per_task[{task!r}]"
                raise ValueError(f"{option} = {name!r} is not a reward; known: {', '.join(sorted(REWARDS))}")
        self.answer_format.validate()

    def reward_name(self, task: str | None) -> str:
        return self.per_task.get(task or "", self.default)

    def score_answer(self, answer: str, reference: str, task: str | None = None) -> float:
        """Score an already extracted ``answer`` against ``reference`` (float in [0, 1])."""
        return REWARDS[self.reward_name(task)](answer, reference)

    def score(self, response: str, reference: str, task: str | None = None) -> float:
        """Extract the answer from ``response`` and score it against ``reference`` (float in [0, 1])."""
        return self.score_answer(extract_answer(response, self.answer_format), reference, task)

    def score_all(self, responses: list[str], references: list[str],
                  tasks: list[str | None]) -> list[float]:
        """:meth:`score` of each (response, reference, task); NaN for a sample whose reward
        raised or returned a non-finite value (logged once per call with the first error,
        so one bad sample marks that sample, not the run)."""
        scores, failures = [], []
        for response, reference, task in zip(responses, references, tasks, strict=True):
            try:
                value = float(self.score(response, reference, task))
            except Exception as exc:  # a user's reward function may raise anything
                value = math.nan
                failures.append(f"{self.reward_name(task)} raised {type(exc).__name__}: {exc}")
            else:
                if not math.isfinite(value):
                    failures.append(f"{self.reward_name(task)} returned {value}")
                    value = math.nan
            scores.append(value)
        if failures:
            logger.warning("%d of %d rewards failed and get zero weight (first: %s)",
                           len(failures), len(scores), failures[0])
        return scores


def overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """DAPO's soft overlong punishment of a response of ``length`` tokens under a budget of
    ``max_length``: 0 up to ``max_length - buffer`` tokens, then falling linearly to -1 at
    ``max_length`` (``(max_length - buffer - length) / buffer``), -1 beyond."""
    free = max_length - buffer
    if length <= free:
        return 0.0
    return max(-1.0, (free - length) / buffer)
