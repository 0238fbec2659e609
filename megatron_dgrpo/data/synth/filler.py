"""Filler prose: a bank of generated sentences with precomputed token counts.

The bank is built once per (seed, counter) from templates and word lists, so documents are cheap to
assemble (sampling sentence indices) while staying varied: with the default 20,000 sentences and the
combinatorics of :mod:`.words`, a 16K-token document rarely repeats a sentence. Filler never names a
person, relation, item kind or guild used by task facts, so it cannot contradict a needle; documents
get their look-alike *decoy* facts from the task families instead (see :mod:`.tasks`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from . import words
from .length import TokenCounter

_TEMPLATES = (
    "The {adj} {noun} was {adj2} {time}, and {people} {verb} it {adverb}.",
    "{People} {verb} the {noun} {adverb}, although {weather}.",
    "Near the {adj} {noun}, {weather}, so {people} {verb} the {noun2} instead.",
    "Few records survive about the {noun}, but {people} {verb} it {adverb}.",
    "{Count} of {people} {verb} the {adj} {noun} {time}.",
    "When {weather}, {people} {verb} the {noun} and then the {noun2}.",
    "The walls of the {noun} were made of {material}, and {people} {verb} them {adverb}.",
    "It was said that the {adj} {noun} had stood for {number} years before {people} {verb} it.",
    "Between the {noun} and the {noun2} ran a {adj} path that {people} {verb} {adverb}.",
    "Nobody could agree whether the {noun} was more {adj} than the {noun2}.",
    "{Time}, {people} {verb} the {adj} {noun} {adverb}.",
    "A {adj} smell drifted from the {noun} whenever {weather}.",
    "The {noun} stood {number} paces from the {adj} {noun2}, where {people} {verb} the gate.",
    "Each visitor to the {noun} remarked that it felt {adj} and {adj2}.",
)


@dataclass(frozen=True, slots=True)
class Piece:
    """One piece of a document and its length in tokens (under the bank's counter).

    Filler sentences are plain pieces; the document builder also makes section headings
    (``heading=True``) and needles (``needle_index`` >= 0, the needle's position in its request).
    """

    text: str
    tokens: int
    heading: bool = False
    needle_index: int = -1


def _fill(template: str, rng: random.Random) -> str:
    people = rng.choice(words.PEOPLE)
    time = rng.choice(words.TIMES)
    return template.format(
        adj=rng.choice(words.ADJECTIVES),
        adj2=rng.choice(words.ADJECTIVES),
        noun=rng.choice(words.NOUNS),
        noun2=rng.choice(words.NOUNS),
        people=people,
        People=people.capitalize(),
        verb=rng.choice(words.VERBS_PAST),
        adverb=rng.choice(words.ADVERBS),
        time=time,
        Time=time.capitalize(),
        weather=rng.choice(words.WEATHER),
        material=rng.choice(words.MATERIALS),
        number=rng.randint(2, 400),
        Count=rng.choice(("Two", "Three", "Several", "Many", "Some")),
    )


class FillerBank:
    """A fixed, seeded list of filler sentences; ``sample`` draws them up to a token budget."""

    def __init__(self, counter: TokenCounter, seed: int, size: int = 20_000) -> None:
        if size <= 0:
            raise ValueError(f"filler bank size must be positive, got {size}")
        rng = random.Random(f"filler:{seed}")
        texts = [_fill(rng.choice(_TEMPLATES), rng) for _ in range(size)]
        self.sentences = [Piece(text, counter.count(text)) for text in texts]

    def sample(self, rng: random.Random, budget_tokens: int) -> list[Piece]:
        """Random sentences whose token counts sum to at least ``budget_tokens`` (one may overshoot)."""
        chosen: list[Piece] = []
        total = 0
        while total < budget_tokens:
            batch = rng.choices(self.sentences, k=max(8, (budget_tokens - total) // 25))
            for sentence in batch:
                chosen.append(sentence)
                total += sentence.tokens
                if total >= budget_tokens:
                    break
        return chosen
