"""Assemble a sectioned document of a target token length with needles at controlled depths.

Depth convention (used everywhere in this package): the depth of a needle is
``tokens_before_needle / (document_tokens - needle_tokens)``, a float in [0, 1]: 0.0 means the
needle opens the document, 1.0 means nothing follows it. Tokens are those of the builder's
:class:`~.length.TokenCounter`, summed piece by piece (exact for the approximate counter).

Layout: the document is split into sections of about ``tokens_per_section`` tokens, each opened by a
heading line ``## Section <n>: <title>``; sentences run on in paragraphs of six. Needles are ordinary
sentences placed in the running text, never before the first heading.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

from . import words
from .filler import FillerBank, Piece
from .length import TokenCounter

SENTENCES_PER_PARAGRAPH = 6


@dataclass(frozen=True)
class Needle:
    """A sentence to place, and its requested depth in [0, 1]."""

    text: str
    depth: float


@dataclass(frozen=True)
class PlacedNeedle:
    """Where a needle ended up: character span in the text, actual depth, 1-based section."""

    start: int
    end: int
    depth: float
    section: int


@dataclass(frozen=True)
class Document:
    """An assembled document. ``needles`` follow the order of the requested needles."""

    text: str
    num_tokens: int
    needles: list[PlacedNeedle]
    section_titles: list[str]


def _section_title(rng: random.Random) -> str:
    return f"The {rng.choice(words.ADJECTIVES).capitalize()} {rng.choice(words.NOUNS).capitalize()}"


class DocumentBuilder:
    """Builds documents from a filler bank; one builder serves many documents."""

    def __init__(self, bank: FillerBank, counter: TokenCounter, tokens_per_section: int = 512) -> None:
        if tokens_per_section <= 0:
            raise ValueError(f"tokens_per_section must be positive, got {tokens_per_section}")
        self.bank = bank
        self.counter = counter
        self.tokens_per_section = tokens_per_section

    def build(self, rng: random.Random, target_tokens: int, needles: list[Needle]) -> Document:
        """A document of about ``target_tokens`` tokens (within one filler sentence) holding ``needles``."""
        for needle in needles:
            if not 0.0 <= needle.depth <= 1.0:
                raise ValueError(f"needle depth must be in [0, 1], got {needle.depth}")
        needle_units = [
            Piece(n.text, self.counter.count(n.text), needle_index=i) for i, n in enumerate(needles)
        ]
        num_sections = max(1, round(target_tokens / self.tokens_per_section))
        titles = [_section_title(rng) for _ in range(num_sections)]
        heading_texts = [f"## Section {i + 1}: {title}" for i, title in enumerate(titles)]
        headings = [Piece(text, self.counter.count(text), heading=True) for text in heading_texts]
        fixed = sum(u.tokens for u in needle_units) + sum(h.tokens for h in headings)
        filler = self.bank.sample(rng, max(1, target_tokens - fixed))
        base = self._interleave_headings(headings, filler)
        units = self._insert_needles(base, needle_units, needles)
        return self._render(units, len(needles), titles)

    @staticmethod
    def _interleave_headings(headings: list[Piece], filler: list[Piece]) -> list[Piece]:
        filler_total = sum(s.tokens for s in filler)
        units: list[Piece] = []
        next_heading, seen = 0, 0
        for sentence in filler:
            while next_heading < len(headings) and seen >= next_heading * filler_total / len(headings):
                units.append(headings[next_heading])
                next_heading += 1
            units.append(sentence)
            seen += sentence.tokens
        units.extend(headings[next_heading:])
        return units

    @staticmethod
    def _insert_needles(base: list[Piece], needle_units: list[Piece], needles: list[Needle]) -> list[Piece]:
        prefix = [0]
        for unit in base:
            prefix.append(prefix[-1] + unit.tokens)
        total = prefix[-1] + sum(u.tokens for u in needle_units)
        order = sorted(range(len(needles)), key=lambda i: needles[i].depth)
        gaps: dict[int, list[Piece]] = {}
        lowest_gap, placed_tokens = 1, 0
        for i in order:
            unit = needle_units[i]
            wanted = needles[i].depth * (total - unit.tokens) - placed_tokens
            gap = bisect.bisect_left(prefix, wanted, lo=lowest_gap)
            if gap > lowest_gap and (gap == len(prefix) or prefix[gap] - wanted > wanted - prefix[gap - 1]):
                gap -= 1
            gap = min(gap, len(prefix) - 1)
            gaps.setdefault(gap, []).append(unit)
            lowest_gap, placed_tokens = gap, placed_tokens + unit.tokens
        units: list[Piece] = []
        for position, unit in enumerate(base):
            units.extend(gaps.get(position, ()))
            units.append(unit)
        units.extend(gaps.get(len(base), ()))
        return units

    @staticmethod
    def _render(units: list[Piece], num_needles: int, titles: list[str]) -> Document:
        total = sum(u.tokens for u in units)
        parts: list[str] = []
        length, tokens_before, section, in_paragraph = 0, 0, 0, 0
        placed: dict[int, PlacedNeedle] = {}
        for unit in units:
            if unit.heading:
                separator = "\n\n" if parts else ""
                section += 1
                in_paragraph = 0
            elif in_paragraph == 0:
                separator = "\n\n"
            else:
                separator = " "
            if not unit.heading:
                in_paragraph = (in_paragraph + 1) % SENTENCES_PER_PARAGRAPH
            parts.append(separator)
            length += len(separator)
            if unit.needle_index >= 0:
                depth = tokens_before / max(1, total - unit.tokens)
                placed[unit.needle_index] = PlacedNeedle(length, length + len(unit.text), depth, section)
            parts.append(unit.text)
            length += len(unit.text)
            tokens_before += unit.tokens
        return Document("".join(parts), total, [placed[i] for i in range(num_needles)], titles)
