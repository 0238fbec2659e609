"""Assemble a sectioned document of a target token length with needles at controlled depths.

Depth convention (used everywhere in this package): the depth of a needle is
``tokens_before_needle / (document_tokens - needle_tokens)``, a float in [0, 1]: 0.0 means the
needle opens the document (only the first heading precedes it), 1.0 means nothing follows it.
Depths are computed from the builder's :class:`~.length.TokenCounter` summed piece by piece
(exact for the approximate counter, within a few percent for BPE tokenizers); ``num_tokens`` is
the whole text measured at once.

Layout, in order:

1. **Budget.** Every section opens with a heading line: ``## Section <n>: <title>`` when sections
   are at least :data:`TITLED_SECTION_TOKENS` long, ``## Section <n>`` otherwise. There are
   ``max(MIN_SECTIONS, round(target / tokens_per_section))`` sections, so even a 64-token document
   has four (short) ones. Headings and needles are always placed; decoys are kept in their given
   order while they fit in the target; filler sentences fill what is left, stopping at the sentence
   count that lands nearest the target. The assembled text is then measured and, when joining
   the pieces changed the count (BPE merges, separator tokens), the budget is redone once with the
   difference. A document is longer than its target only when its headings and needles alone are
   (e.g. a 4-hop chain in 128 tokens with a small-vocabulary tokenizer).
2. **Body.** Needles with a depth and decoys go between filler sentences at the requested depths.
3. **Sections.** The body is cut into the sections at the unit boundaries nearest equal token
   shares, each section holding at least one sentence; a needle pinned to a section
   (``Needle.section``) is then put inside that section at its relative position ``depth``.

Sentences run on in paragraphs of six.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass

from . import words
from .filler import FillerBank, Piece
from .length import TokenCounter

SENTENCES_PER_PARAGRAPH = 6
MIN_SECTIONS = 4
TITLED_SECTION_TOKENS = 128


@dataclass(frozen=True)
class Needle:
    """A sentence to place and its requested depth in [0, 1].

    With ``section`` set (1-based), the needle is placed inside that section and ``depth`` is its
    relative position there (0: right after the heading, 1: at the end of the section).
    """

    text: str
    depth: float
    section: int | None = None


@dataclass(frozen=True)
class PlacedNeedle:
    """Where a needle ended up: character span in the text, actual depth, 1-based section."""

    start: int
    end: int
    depth: float
    section: int


@dataclass(frozen=True)
class Document:
    """An assembled document. ``needles`` follow the order of the requested needles;
    ``num_tokens`` is ``counter.count(text)``; ``decoys_kept`` counts the decoys that fit."""

    text: str
    num_tokens: int
    needles: list[PlacedNeedle]
    headings: list[str]
    decoys_kept: int


def _section_title(rng: random.Random) -> str:
    return f"The {rng.choice(words.ADJECTIVES).capitalize()} {rng.choice(words.NOUNS).capitalize()}"


def _nearest_gap(prefix: list[int], wanted: float, lo: int, hi: int) -> int:
    """The index in ``prefix[lo..hi]`` (a non-decreasing list) whose value is nearest ``wanted``."""
    gap = min(max(bisect.bisect_left(prefix, wanted, lo=lo, hi=hi + 1), lo), hi)
    if gap > lo and prefix[gap] - wanted > wanted - prefix[gap - 1]:
        gap -= 1
    return gap


def _prefix_sums(pieces: list[Piece]) -> list[int]:
    """``[0, t0, t0 + t1, ...]``: the tokens before each gap between ``pieces``."""
    sums = [0]
    for piece in pieces:
        sums.append(sums[-1] + piece.tokens)
    return sums


def _prefix_within(pieces: list[Piece], budget: int) -> list[Piece]:
    """The longest prefix of ``pieces`` whose tokens sum to at most ``budget``."""
    total = 0
    for count, piece in enumerate(pieces):
        total += piece.tokens
        if total > budget:
            return pieces[:count]
    return list(pieces)


def _nearest_prefix(pieces: list[Piece], budget: int) -> list[Piece]:
    """The prefix of ``pieces`` whose tokens sum nearest ``budget`` (the shorter one on a tie)."""
    best, best_error, total = 0, abs(budget), 0
    for count, piece in enumerate(pieces, start=1):
        total += piece.tokens
        if abs(total - budget) < best_error:
            best, best_error = count, abs(total - budget)
    return list(pieces[:best])


class DocumentBuilder:
    """Builds documents from a filler bank; one builder serves many documents."""

    def __init__(self, bank: FillerBank, counter: TokenCounter, tokens_per_section: int = 512) -> None:
        if tokens_per_section <= 0:
            raise ValueError(f"tokens_per_section must be positive, got {tokens_per_section}")
        self.bank = bank
        self.counter = counter
        self.tokens_per_section = tokens_per_section

    def num_sections(self, target_tokens: int) -> int:
        """Sections of a ``target_tokens`` document: one per ``tokens_per_section``, at least four."""
        return max(MIN_SECTIONS, round(target_tokens / self.tokens_per_section))

    def _piece(self, text: str, **kind) -> Piece:
        return Piece(text, self.counter.count(text), **kind)

    def build(
        self, rng: random.Random, target_tokens: int, needles: Sequence[Needle], decoys: Sequence[Needle] = ()
    ) -> Document:
        """A document of about ``target_tokens`` tokens holding ``needles`` and the decoys that fit.

        Pieces are counted one by one to plan the layout; the assembled text is then measured,
        and when joining the pieces changed the count (BPE merges across spaces, separator
        tokens) the plan is redone once with that difference taken off the budget.
        """
        num_sections = self.num_sections(target_tokens)
        for needle in [*needles, *decoys]:
            if not 0.0 <= needle.depth <= 1.0:
                raise ValueError(f"needle depth must be in [0, 1], got {needle.depth}")
            if needle.section is not None and not 1 <= needle.section <= num_sections:
                raise ValueError(f"needle section must be in 1..{num_sections}, got {needle.section}")
        titled = target_tokens / num_sections >= TITLED_SECTION_TOKENS
        heading_texts = [
            f"## Section {i + 1}: {_section_title(rng)}" if titled else f"## Section {i + 1}"
            for i in range(num_sections)
        ]
        headings = [self._piece(text, heading=True) for text in heading_texts]
        needle_units = [self._piece(n.text, needle_index=i) for i, n in enumerate(needles)]
        decoy_units = [self._piece(d.text, needle_index=len(needles) + i) for i, d in enumerate(decoys)]
        fixed = sum(u.tokens for u in [*headings, *needle_units])
        pool: list[Piece] = []
        overhead = 0
        for _ in range(2):
            room = target_tokens - fixed - overhead
            kept = _prefix_within(decoy_units, room)
            budget = room - sum(u.tokens for u in kept)
            if budget > sum(p.tokens for p in pool):
                pool += self.bank.sample(rng, budget - sum(p.tokens for p in pool))
            filler = _nearest_prefix(pool, budget)
            placed = [*needles, *decoys[: len(kept)]]
            free = sum(n.section is None for n in placed)  # pinned needles go in after the body is cut
            while len(filler) + free < num_sections:  # at least one sentence per section
                filler.append(rng.choice(self.bank.sentences))
            units = self._layout(filler, [*needle_units, *kept], placed, headings)
            doc = self._render(units, len(needles), heading_texts, len(kept))
            overhead = doc.num_tokens - sum(u.tokens for u in units)
            if overhead == 0:
                break
        return doc

    def _layout(
        self, filler: list[Piece], units: list[Piece], placed: list[Needle], headings: list[Piece]
    ) -> list[Piece]:
        """Headings and sections in document order: ``units[i]`` is the piece of ``placed[i]``."""
        free = [i for i, n in enumerate(placed) if n.section is None]
        body = self._insert_by_depth(filler, [units[i] for i in free], [placed[i].depth for i in free])
        sections = self._split(body, len(headings))
        for unit, needle in zip(units, placed):
            if needle.section is not None:
                self._insert_in_section(sections[needle.section - 1], unit, needle.depth)
        return [unit for heading, section in zip(headings, sections) for unit in (heading, *section)]

    @staticmethod
    def _insert_by_depth(base: list[Piece], units: list[Piece], depths: list[float]) -> list[Piece]:
        """``base`` with ``units`` inserted between its pieces at the given depths (in body tokens)."""
        prefix = _prefix_sums(base)
        total = prefix[-1] + sum(u.tokens for u in units)
        gaps: dict[int, list[Piece]] = {}
        lowest_gap, placed_tokens = 0, 0
        for i in sorted(range(len(units)), key=lambda i: depths[i]):
            wanted = depths[i] * (total - units[i].tokens) - placed_tokens
            gap = _nearest_gap(prefix, wanted, lowest_gap, len(prefix) - 1)
            gaps.setdefault(gap, []).append(units[i])
            lowest_gap, placed_tokens = gap, placed_tokens + units[i].tokens
        out: list[Piece] = []
        for position, piece in enumerate(base):
            out.extend(gaps.get(position, ()))
            out.append(piece)
        out.extend(gaps.get(len(base), ()))
        return out

    @staticmethod
    def _split(body: list[Piece], num_sections: int) -> list[list[Piece]]:
        """Cut ``body`` (at least ``num_sections`` pieces) into non-empty runs of about equal tokens."""
        prefix = _prefix_sums(body)
        cuts = [0]
        for k in range(1, num_sections):
            lo, hi = cuts[-1] + 1, len(body) - (num_sections - k)
            cuts.append(_nearest_gap(prefix, k * prefix[-1] / num_sections, lo, hi))
        cuts.append(len(body))
        return [body[a:b] for a, b in zip(cuts, cuts[1:])]

    @staticmethod
    def _insert_in_section(section: list[Piece], unit: Piece, within: float) -> None:
        prefix = _prefix_sums(section)
        section.insert(_nearest_gap(prefix, within * prefix[-1], 0, len(section)), unit)

    def _render(
        self, units: list[Piece], num_needles: int, headings: list[str], decoys_kept: int
    ) -> Document:
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
            if 0 <= unit.needle_index < num_needles:
                depth = tokens_before / max(1, total - unit.tokens)
                placed[unit.needle_index] = PlacedNeedle(length, length + len(unit.text), depth, section)
            parts.append(unit.text)
            length += len(unit.text)
            tokens_before += unit.tokens
        text = "".join(parts)
        return Document(text, self.counter.count(text), [placed[i] for i in range(num_needles)], headings,
                        decoys_kept)
