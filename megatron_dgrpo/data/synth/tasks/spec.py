"""What a task family hands to the document builder: the question, answer and sentences to place."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..words import NameFactory

UNANSWERABLE = "unanswerable"
DEFAULT_UNANSWERABLE_SHARE = 1 / 3


@dataclass(frozen=True)
class TaskContext:
    """Inputs every task maker receives. ``target_tokens`` lets makers scale their decoy counts;
    ``unanswerable_share`` is the probability that an ``unanswerable`` question lacks its fact."""

    rng: random.Random
    names: NameFactory
    hops: int
    target_tokens: int
    unanswerable_share: float = DEFAULT_UNANSWERABLE_SHARE

    @property
    def num_decoys(self) -> int:
        """About one look-alike decoy fact per 512 tokens of document, at least two."""
        return max(2, self.target_tokens // 512)


@dataclass(frozen=True)
class TaskSpec:
    """A generated task before layout.

    ``question_template`` is the question with its entity slots abstracted (``{person}``,
    ``{kind}``, ...): every question the template yields has the same answer distribution, and the
    no-context baseline (:mod:`megatron_dgrpo.data.baseline`) keys on it.
    ``needles[0]`` is the primary needle, placed at the controlled depth; the other needles are
    spread evenly around the document from there; ``decoys`` go to random depths, in order of
    importance (the document builder drops the last ones when they do not fit). When
    ``answer_is_section`` is true, ``needles[0]`` goes to a uniformly drawn section and the answer
    is the number of that section, filled in after layout.
    """

    family: str
    task: str
    question: str
    question_template: str
    answer: str
    needles: list[str]
    decoys: list[str] = field(default_factory=list)
    hops: int = 0
    answer_is_section: bool = False


class FactRegistry:
    """Keeps (subject, relation) -> object unique within a document so every question has one answer."""

    def __init__(self) -> None:
        self.facts: dict[tuple[str, str], str] = {}

    def add(self, subject: str, relation: str, obj: str) -> None:
        """Record a fact; a second object for the same (subject, relation) is a generator bug."""
        if (subject, relation) in self.facts:
            raise ValueError(f"fact ({subject!r}, {relation!r}) already has an object")
        self.facts[(subject, relation)] = obj
