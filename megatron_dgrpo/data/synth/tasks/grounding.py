"""Contextual grounding: counterfactual facts, and questions the document cannot answer.

* ``counterfactual``: the document restates a well-known fact with a different value ("the capital
  of France is Osaka"); the right answer is the document's value, not world knowledge. Other
  counterfactual statements about other subjects serve as decoys.
* ``unanswerable``: the document holds relation facts about several people, including the person
  asked about, and the asked relation for someone else, but never the asked relation of that
  person; the right answer is ``unanswerable``.
"""

from __future__ import annotations

from ..words import RELATIONS
from .multihop import fact_sentence
from .spec import UNANSWERABLE, FactRegistry, TaskContext, TaskSpec

_CITIES = (
    "Paris",
    "Tokyo",
    "Rome",
    "Cairo",
    "Ottawa",
    "Canberra",
    "Lima",
    "Oslo",
    "Madrid",
    "Osaka",
    "Lyon",
    "Milan",
    "Sydney",
    "Toronto",
    "Nairobi",
    "Lisbon",
)
_PEOPLE = (
    "William Shakespeare",
    "Charles Dickens",
    "Jane Austen",
    "Leo Tolstoy",
    "Homer",
    "Alexander Graham Bell",
    "Thomas Edison",
    "Nikola Tesla",
    "Leonardo da Vinci",
    "Vincent van Gogh",
    "Pablo Picasso",
    "Rembrandt",
)
_PLANETS = ("Jupiter", "Saturn", "Neptune", "Mars", "Venus", "Uranus", "Mercury")

# (subject phrase, value per common knowledge, pool of alternative values)
COMMON_FACTS = (
    ("the capital of France", "Paris", _CITIES),
    ("the capital of Japan", "Tokyo", _CITIES),
    ("the capital of Australia", "Canberra", _CITIES),
    ("the capital of Canada", "Ottawa", _CITIES),
    ("the largest planet in the Solar System", "Jupiter", _PLANETS),
    ("the planet closest to the Sun", "Mercury", _PLANETS),
    ("the author of Hamlet", "William Shakespeare", _PEOPLE),
    ("the author of War and Peace", "Leo Tolstoy", _PEOPLE),
    ("the inventor of the telephone", "Alexander Graham Bell", _PEOPLE),
    ("the painter of the Mona Lisa", "Leonardo da Vinci", _PEOPLE),
    ("the chemical symbol for gold", "Au", ("Ag", "Fe", "Pb", "Sn", "Cu", "Zn", "Hg")),
    ("the boiling point of water at sea level in degrees Celsius", "100", ("80", "90", "120", "150")),
    ("the number of legs of a spider", "8", ("6", "10", "12", "4")),
    ("the longest river in Africa", "the Nile", ("the Congo", "the Niger", "the Zambezi")),
    ("the largest ocean on Earth", "the Pacific", ("the Atlantic", "the Indian Ocean", "the Arctic")),
    ("the currency of Japan", "the yen", ("the peso", "the krona", "the rupee", "the franc")),
)

STATEMENT_TEMPLATES = (
    "In this document, {subject} is {value}.",
    "As recorded in these pages, {subject} is {value}.",
    "Throughout the account that follows, {subject} is {value}.",
)


def _statement(ctx: TaskContext, index: int) -> tuple[str, str]:
    subject, truth, pool = COMMON_FACTS[index]
    value = ctx.rng.choice([v for v in pool if v != truth])
    return ctx.rng.choice(STATEMENT_TEMPLATES).format(subject=subject, value=value), value


def make_counterfactual(ctx: TaskContext) -> TaskSpec:
    """Ask for a subject whose value the document changed; decoys change other subjects."""
    chosen = ctx.rng.sample(range(len(COMMON_FACTS)), min(len(COMMON_FACTS), 1 + ctx.num_decoys))
    needle, value = _statement(ctx, chosen[0])
    decoys = [_statement(ctx, index)[0] for index in chosen[1:]]
    return TaskSpec(
        family="grounding",
        task="counterfactual",
        question=f"According to the document, what is {COMMON_FACTS[chosen[0]][0]}?",
        answer=value,
        needles=[needle],
        decoys=decoys,
    )


def make_unanswerable(ctx: TaskContext) -> TaskSpec:
    """Ask for a relation of a person the document mentions, but never for that relation."""
    rng, registry = ctx.rng, FactRegistry()
    person = ctx.names.person()
    asked, *known = rng.sample(RELATIONS, 3)
    needles = []
    for relation in known:
        other = ctx.names.person()
        registry.add(person, relation, other)
        needles.append(fact_sentence(ctx, person, relation, other))
    decoys = []
    for index in range(ctx.num_decoys):
        subject, obj = ctx.names.person(), ctx.names.person()
        relation = asked if index == 0 else rng.choice(RELATIONS)  # the asked relation does occur
        registry.add(subject, relation, obj)
        decoys.append(fact_sentence(ctx, subject, relation, obj))
    return TaskSpec(
        family="grounding",
        task="unanswerable",
        question=f"Who is the {asked} of {person}?",
        answer=UNANSWERABLE,
        needles=needles,
        decoys=decoys,
    )
