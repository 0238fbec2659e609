"""What a RULER task hands the suite generator: a sample's fixed content, rendered at any size.

A task makes one :class:`Instance` per sample from a :class:`TaskContext` (all of the sample's
randomness is drawn then). ``instance.render(n)`` builds the prompt with ``n`` context units
(haystack sentences, list words, documents), deterministically, so the generator can search for the
largest ``n`` that fits the length budget (:func:`.haystack.fit_units`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

from ..synth.filler import FillerBank
from ..synth.length import TokenCounter


@dataclass(frozen=True)
class Rendered:
    """One prompt: ``document`` then ``question`` form the user message; ``references`` are what the
    answer must contain. ``depths``: actual depths of the needles holding the references (reference
    order); ``depth_target``: the depth asked for the first of them (None: no needle depth)."""

    document: str
    question: str
    references: tuple[str, ...]
    depths: tuple[float, ...] = ()
    depth_target: float | None = None
    hops: int | None = None


class Instance(Protocol):
    """One sample's content. ``min_units``: the smallest context it renders at."""

    min_units: int

    def tokens_per_unit(self) -> float:
        """About how many tokens one more context unit adds (for the first guess of the search)."""
        ...

    def render(self, n: int) -> Rendered:
        """The prompt with ``n >= min_units`` context units."""
        ...


@dataclass
class TaskContext:
    """What a task may use to make a sample.

    ``rng`` is the sample's own random stream and ``seed`` a string naming the sample (for derived
    streams); ``counter`` measures texts in tokens; ``bank`` is the essay haystack's filler;
    ``target_tokens`` the length asked for; ``depth`` the depth of the first answer needle (None:
    RULER's rule, a random one of its 40 depths).
    """

    rng: random.Random
    seed: str
    counter: TokenCounter
    bank: FillerBank
    target_tokens: int
    depth: float | None = None


class RulerTask(Protocol):
    """A task family member: its name, RULER's generation budget and its samples."""

    name: str
    tokens_to_generate: int

    def instance(self, context: TaskContext) -> Instance:
        ...
