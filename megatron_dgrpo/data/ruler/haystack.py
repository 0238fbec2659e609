"""Haystacks, needle insertion by depth, and fitting a prompt to a token budget (RULER's rules).

**Haystacks** (RULER's ``type_haystack``), each a sequence of *units* whose first ``n`` form the
context:

* ``noise``: RULER's repeated sentence :data:`NOISE`, units joined by newlines;
* ``essay``: sentences of the project's filler prose (:class:`~..synth.filler.FillerBank`, standing
  in for RULER's Paul Graham essays), joined by spaces;
* ``needle``: look-alike needles with other random keys and values, joined by newlines.

**Depths.** RULER's depths are the 40 evenly spaced percentages 0, 3, 5, ..., 100
(:data:`RULER_DEPTHS`, as fractions). A needle at depth ``d`` goes into the gap before unit
``int(n * d)`` (gap ``n`` is the end). Its *actual* depth is ``tokens before it / (context tokens -
its own tokens)``, from the units' token counts (exact for the approximate counter, within BPE
merges at unit boundaries otherwise).

**Fitting.** :func:`fit_units` finds the largest unit count whose measured prompt fits a budget.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..synth.filler import FillerBank, Piece
from ..synth.length import TokenCounter

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
RULER_DEPTHS = tuple(round(100 * i / 39) / 100 for i in range(40))
HAYSTACKS = ("noise", "essay", "needle")


@dataclass(frozen=True)
class Placed:
    """A needle in a rendered context: its text and actual depth (see the module docstring)."""

    text: str
    depth: float


class Haystack:
    """Units of one haystack kind for one sample, reproducible: ``units(n)`` is a prefix of ``units(n + 1)``.

    ``needle_maker(rng) -> str`` makes one look-alike needle (``needle`` haystacks only).
    """

    def __init__(self, kind: str, counter: TokenCounter, seed: str, bank: FillerBank | None = None,
                 needle_maker: Callable[[random.Random], str] | None = None) -> None:
        if kind not in HAYSTACKS:
            raise ValueError(f"haystack must be one of {HAYSTACKS}, got {kind!r}")
        if kind == "essay" and bank is None:
            raise ValueError("an essay haystack needs a filler bank")
        if kind == "needle" and needle_maker is None:
            raise ValueError("a needle haystack needs a needle maker")
        self.kind, self.counter, self.seed = kind, counter, seed
        self.bank, self.needle_maker = bank, needle_maker
        self.separator = " " if kind == "essay" else "\n"
        self._noise = Piece(NOISE, counter.count(NOISE))
        self._cache: list[Piece] = []
        self._rng = random.Random(f"haystack:{seed}")

    def units(self, n: int) -> list[Piece]:
        """The first ``n`` units."""
        if self.kind == "noise":
            return [self._noise] * n
        while len(self._cache) < n:
            if self.kind == "essay":
                self._cache.append(self._rng.choice(self.bank.sentences))
            else:
                text = self.needle_maker(self._rng)
                self._cache.append(Piece(text, self.counter.count(text)))
        return self._cache[:n]

    def tokens_per_unit(self) -> float:
        """Mean tokens of a unit (for a first guess of the unit count)."""
        if self.kind == "noise":
            return float(self._noise.tokens)
        sample = self.units(64)
        return sum(u.tokens for u in sample) / len(sample)


def insert_needles(units: Sequence[Piece], needles: Sequence[tuple[Piece, float]],
                   separator: str) -> tuple[str, list[Placed]]:
    """Join ``units`` with the needles placed at their depths; returns the text and, in the order
    of ``needles``, where each ended up. Needles sharing a gap keep their given order."""
    n = len(units)
    order = sorted(range(len(needles)), key=lambda i: (int(n * needles[i][1]), i))
    gaps = [int(n * needles[i][1]) for i in order]
    total = sum(u.tokens for u in units) + sum(p.tokens for p, _ in needles)
    parts: list[str] = []
    placed: dict[int, Placed] = {}
    tokens_before, next_needle = 0, 0
    for position in range(n + 1):
        while next_needle < len(order) and gaps[next_needle] == position:
            piece = needles[order[next_needle]][0]
            placed[order[next_needle]] = Placed(piece.text, tokens_before / max(1, total - piece.tokens))
            parts.append(piece.text)
            tokens_before += piece.tokens
            next_needle += 1
        if position < n:
            parts.append(units[position].text)
            tokens_before += units[position].tokens
    return separator.join(parts), [placed[i] for i in range(len(needles))]


def grid_depths(rng: random.Random, count: int, first: float | None = None) -> list[float]:
    """``count`` distinct depths from :data:`RULER_DEPTHS` in random order (RULER's rule); with
    ``first`` the first depth is ``first`` and the others avoid the grid point nearest to it."""
    if first is None:
        return rng.sample(RULER_DEPTHS, count)
    nearest = min(RULER_DEPTHS, key=lambda d: abs(d - first))
    others = [d for d in RULER_DEPTHS if d != nearest]
    return [first, *rng.sample(others, count - 1)]


def fit_units(measure: Callable[[int], int], budget: int, guess: int, minimum: int = 1,
              what: str = "prompt") -> int:
    """The largest ``n >= minimum`` with ``measure(n) <= budget`` (tokens), for a ``measure`` that
    grows with ``n``: gallops from ``guess`` in steps of ``guess / 64`` (doubling), then bisects.

    Raises ValueError naming ``what`` if even ``minimum`` units do not fit.
    """
    cache: dict[int, int] = {}

    def fits(n: int) -> bool:
        if n not in cache:
            cache[n] = measure(n)
        return cache[n] <= budget

    if not fits(minimum):
        raise ValueError(f"{what}: {cache[minimum]} tokens with the smallest context ({minimum} units) "
                         f"exceed the budget of {budget} tokens; choose a longer length")
    step = max(1, guess // 64)
    n = max(minimum, guess)
    if fits(n):
        low, high = n, n + step
        while fits(high):
            low, step = high, step * 2
            high = low + step
    else:
        high, low = n, max(minimum, n - step)
        while not fits(low):
            high, step = low, step * 2
            low = max(minimum, low - step)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low
