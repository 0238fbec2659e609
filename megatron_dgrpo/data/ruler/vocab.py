"""Words, keys and values for RULER's tasks, made offline (RULER itself draws on the wonderwords
word lists and a downloaded English word list; neither is needed here).

* :func:`vocabulary` ``(size)``: ``size`` distinct lowercase words, always the same ones in the same
  order: the real words of :mod:`..synth.words` first, then pronounceable pseudo-words
  (:class:`~..synth.words.NameFactory`, seeded by a fixed string). A shorter vocabulary is a prefix
  of a longer one.
* Needle keys and values, by RULER's kinds: ``words`` (an adjective-noun pair such as
  ``quiet-velmar``), ``numbers`` (7 digits, no leading zero) and ``uuids`` (version-4 UUID text).
"""

from __future__ import annotations

import random
import re
import uuid

from ..synth import words
from ..synth.words import NameFactory

VALUE_KINDS = ("words", "numbers", "uuids")
_NOUN_POOL = 4096  # nouns of word keys: 36 adjectives x 4096 nouns = 147,456 distinct keys

_REAL_WORDS = tuple(dict.fromkeys(
    w for group in (words.NOUNS, words.ADJECTIVES, words.MATERIALS, words.ITEM_KINDS, words.RELATIONS,
                    words.INSTITUTIONS, words.GOODS, words.VERBS_PAST, words.ADVERBS)
    for phrase in group for w in phrase.lower().split() if re.fullmatch(r"[a-z]+", w)))
_words: list[str] = list(_REAL_WORDS)
_seen: set[str] = set(_words)
_factory = NameFactory(random.Random("ruler-vocabulary"))


def vocabulary(size: int) -> tuple[str, ...]:
    """The first ``size`` words of the fixed vocabulary (see the module docstring)."""
    if size < 0:
        raise ValueError(f"vocabulary size must be >= 0, got {size}")
    while len(_words) < size:
        word = _factory.word().lower()
        if word not in _seen:
            _seen.add(word)
            _words.append(word)
    return tuple(_words[:size])


def random_value(kind: str, rng: random.Random) -> str:
    """One random key or value of RULER's ``kind`` (see the module docstring)."""
    if kind == "words":
        return f"{rng.choice(words.ADJECTIVES)}-{rng.choice(vocabulary(_NOUN_POOL))}"
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"value kind must be one of {VALUE_KINDS}, got {kind!r}")


def distinct_values(kind: str, count: int, rng: random.Random, exclude: set[str] | None = None) -> list[str]:
    """``count`` different random values of ``kind``, none in ``exclude``."""
    taken = set(exclude or ())
    values: list[str] = []
    while len(values) < count:
        value = random_value(kind, rng)
        if value not in taken:
            taken.add(value)
            values.append(value)
    return values
