"""Needle-in-a-haystack tasks (RULER's ``niah``: single, multi-key, multi-value, multi-query).

Rules (RULER's published generator): ``num_keys`` keys (at least ``num_queries``), each with
``num_values`` values; every (key, value) pair is one needle sentence
``One of the special magic {kind} for {key} is: {value}.``, all needles in random order at distinct
random depths from RULER's 40 (or, with a configured depth, the first queried key's first value at
that depth). ``num_queries`` of the keys are asked for; the references are all values of the
queried keys, in query order. Keys and values are distinct within a sample; in a ``needle``
haystack the look-alike needles never use a real key. With one reference the prompt is phrased in
the singular, as RULER does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..synth.filler import Piece
from .haystack import Haystack, grid_depths, insert_needles
from .spec import Rendered, TaskContext
from .vocab import VALUE_KINDS, distinct_values, random_value

TOKENS_TO_GENERATE = 128


def needle_sentence(value_kind: str, key: str, value: str) -> str:
    return f"One of the special magic {value_kind} for {key} is: {value}."


def query_phrase(keys: list[str]) -> str:
    """RULER's joining of queried keys: ``a``, ``a, and b``, ``a, b, and c``."""
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


@dataclass(frozen=True)
class NeedleTask:
    """One of RULER's needle-in-a-haystack tasks: the ``haystack`` it hides needles in, the
    kinds of keys and values (:data:`VALUE_KINDS`), how many keys, values per key and
    queried keys, and the answer budget in tokens."""

    name: str
    haystack: str
    key_kind: str
    value_kind: str
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    tokens_to_generate: int = TOKENS_TO_GENERATE

    def __post_init__(self) -> None:
        for kind in (self.key_kind, self.value_kind):
            if kind not in VALUE_KINDS:
                raise ValueError(f"{self.name}: key/value kind must be one of {VALUE_KINDS}, got {kind!r}")
        if min(self.num_keys, self.num_values, self.num_queries) < 1:
            raise ValueError(f"{self.name}: needle counts must be >= 1")

    def instance(self, context: TaskContext) -> "NeedleInstance":
        return NeedleInstance(self, context)


class NeedleInstance:
    """One NIAH sample (see the module docstring)."""

    min_units = 1

    def __init__(self, task: NeedleTask, context: TaskContext) -> None:
        rng, counter = context.rng, context.counter
        num_keys = max(task.num_keys, task.num_queries)
        self.keys = distinct_values(task.key_kind, num_keys, rng)
        flat = distinct_values(task.value_kind, num_keys * task.num_values, rng)
        self.values = [flat[i * task.num_values:(i + 1) * task.num_values] for i in range(num_keys)]
        queried = rng.sample(range(num_keys), task.num_queries)
        self.references = tuple(v for k in queried for v in self.values[k])
        pairs = [(k, j) for k in range(num_keys) for j in range(task.num_values)]
        rng.shuffle(pairs)
        primary = pairs.index((queried[0], 0))
        pairs.insert(0, pairs.pop(primary))  # the primary needle takes the first (configured) depth
        depths = grid_depths(rng, len(pairs), first=context.depth)
        self.needles = []
        for (k, j), depth in zip(pairs, depths):
            text = needle_sentence(task.value_kind, self.keys[k], self.values[k][j])
            self.needles.append((Piece(text, counter.count(text)), depth))
        self._answer_needles = [pairs.index((k, j)) for k in queried for j in range(task.num_values)]
        self.depth_target = depths[0]
        keys = set(self.keys)

        def look_alike(needle_rng: random.Random) -> str:
            key = random_value(task.key_kind, needle_rng)
            while key in keys:
                key = random_value(task.key_kind, needle_rng)
            return needle_sentence(task.value_kind, key, random_value(task.value_kind, needle_rng))

        self.haystack = Haystack(task.haystack, counter, context.seed, context.bank, look_alike)
        singular = len(self.references) == 1
        kind = task.value_kind[:-1] if singular else task.value_kind
        query = query_phrase([self.keys[k] for k in queried])
        if singular:
            self.preamble = (f"A special magic {kind} is hidden within the following text. Make sure to "
                             f"memorize it. I will quiz you about the {kind} afterwards.")
            self.question = f"What is the special magic {kind} for {query} mentioned in the provided text?"
        else:
            self.preamble = (f"Some special magic {kind} are hidden within the following text. Make sure "
                             f"to memorize it. I will quiz you about the {kind} afterwards.")
            self.question = (f"What are all the special magic {kind} for {query} mentioned in the "
                             "provided text?")

    def tokens_per_unit(self) -> float:
        return self.haystack.tokens_per_unit()

    def render(self, n: int) -> Rendered:
        text, placed = insert_needles(self.haystack.units(n), self.needles, self.haystack.separator)
        return Rendered(
            document=f"{self.preamble}\n{text}",
            question=self.question,
            references=self.references,
            depths=tuple(placed[i].depth for i in self._answer_needles),
            depth_target=self.depth_target,
        )


NIAH_TASKS = (
    NeedleTask("niah_single_1", "noise", "words", "numbers"),
    NeedleTask("niah_single_2", "essay", "words", "numbers"),
    NeedleTask("niah_single_3", "essay", "words", "uuids"),
    NeedleTask("niah_multikey_1", "essay", "words", "numbers", num_keys=4),
    NeedleTask("niah_multikey_2", "needle", "words", "numbers"),
    NeedleTask("niah_multikey_3", "needle", "uuids", "uuids"),
    NeedleTask("niah_multivalue", "essay", "words", "numbers", num_values=4),
    NeedleTask("niah_multiquery", "essay", "words", "numbers", num_keys=4, num_queries=4),
)
