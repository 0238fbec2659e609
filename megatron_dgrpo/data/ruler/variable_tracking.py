"""Variable tracking (RULER's ``vt``): follow chains of assignments through a noise haystack.

Rules (RULER's published generator): ``num_chains`` chains of ``num_hops + 1`` distinct 5-letter
upper-case variable names; a chain is ``VAR X1 = <5-digit value>`` then ``VAR X2 = VAR X1`` ...
``VAR X{h+1} = VAR X{h}``, its statements in order at random positions among RULER's repeated noise
sentence. Every chain has its own value; the references are the ``num_hops + 1`` names of the first
chain, the question gives its value. One worked example (a short chain in
:data:`ICL_NOISE_SENTENCES` noise sentences, with its answer) precedes the task, as in RULER.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from ..synth.filler import Piece
from .haystack import Haystack, insert_needles
from .spec import Rendered, TaskContext

ICL_NOISE_SENTENCES = 16
PREAMBLE = "Memorize and track the chain(s) of variable assignment hidden in the following text."


def question(value: int) -> str:
    return f"Question: Find all variables that are assigned the value {value} in the text above."


def answer_prefix(num_names: int, value: int) -> str:
    return (f"Answer: According to the chain(s) of variable assignment in the text above, {num_names} "
            f"variables are assigned the value {value}, they are:")


@dataclass(frozen=True)
class VariableTrackingTask:
    name: str = "vt"
    num_chains: int = 1
    num_hops: int = 4
    tokens_to_generate: int = 30

    def __post_init__(self) -> None:
        if self.num_chains < 1 or self.num_hops < 1:
            raise ValueError(f"{self.name}: num_chains and num_hops must be >= 1")

    def instance(self, context: TaskContext) -> "VariableTrackingInstance":
        return VariableTrackingInstance(self, context)


class _Chains:
    """Chains of assignments with their statements at fixed fractional positions."""

    def __init__(self, task: VariableTrackingTask, context: TaskContext, names: set[str],
                 values: set[int]) -> None:
        rng = context.rng
        self.names: list[list[str]] = []
        self.values: list[int] = []
        statements: list[tuple[str, float]] = []
        for _ in range(task.num_chains):
            chain = []
            while len(chain) < task.num_hops + 1:
                name = "".join(rng.choices(string.ascii_uppercase, k=5))
                if name not in names:
                    names.add(name)
                    chain.append(name)
            value = rng.randint(10000, 99999)
            while value in values:
                value = rng.randint(10000, 99999)
            values.add(value)
            self.names.append(chain)
            self.values.append(value)
            texts = [f"VAR {chain[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(chain, chain[1:])]
            positions = sorted(rng.random() for _ in texts)
            statements += list(zip(texts, positions))
        self.statements = [(Piece(text, context.counter.count(text)), depth) for text, depth in statements]

    def context(self, haystack: Haystack, n: int) -> str:
        return insert_needles(haystack.units(n), self.statements, haystack.separator)[0]


class VariableTrackingInstance:
    """One variable-tracking sample (see the module docstring)."""

    min_units = 1

    def __init__(self, task: VariableTrackingTask, context: TaskContext) -> None:
        names: set[str] = set()
        values: set[int] = set()
        self.task = task
        self.haystack = Haystack("noise", context.counter, context.seed)
        example = _Chains(task, context, names, values)
        self.chains = _Chains(task, context, names, values)
        value = example.values[0]
        self.example = (f"{PREAMBLE}\n\n{example.context(self.haystack, ICL_NOISE_SENTENCES)}\n"
                        f"{question(value)} {answer_prefix(task.num_hops + 1, value)} "
                        + " ".join(example.names[0]))

    def tokens_per_unit(self) -> float:
        return self.haystack.tokens_per_unit()

    def render(self, n: int) -> Rendered:
        return Rendered(
            document=f"{self.example}\n\n{PREAMBLE}\n\n{self.chains.context(self.haystack, n)}",
            question=question(self.chains.values[0]),
            references=tuple(self.chains.names[0]),
            hops=self.task.num_hops,
        )
