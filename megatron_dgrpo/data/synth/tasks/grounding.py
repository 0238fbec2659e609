"""Contextual grounding: counterfactual facts, and relation questions the document may not answer.

* ``counterfactual``: the document restates a well-known fact with a different value ("the capital
  of France is Osaka"); the right answer is the document's value, not world knowledge. Every
  subject has at least :data:`MIN_ALTERNATIVES` alternative values, drawn uniformly, so no
  answer to a given question is more likely than 1/10 a priori. Other counterfactual statements
  about other subjects serve as decoys.
* ``unanswerable``: a one-hop relation question phrased exactly like ``multihop``'s ("Who is the
  mentor of X?"). The document always states two relations of the person asked about and the
  asked relation of someone else; with probability ``unanswerable_share`` (default 1/3) neither
  of the person's two relations is the asked one and the right answer is ``unanswerable``,
  otherwise one is and the answer is its object. Answerable and unanswerable documents have the
  same shape, so only reading the exact (person, relation) pair tells them apart.
"""

from __future__ import annotations

from ..words import RELATIONS
from .multihop import chain_question, chain_template, fact_sentence
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
_PLANETS = ("Jupiter", "Saturn", "Neptune", "Mars", "Venus", "Uranus", "Mercury", "Earth", "Pluto",
            "Ceres", "Eris")
_RIVERS = ("the Nile", "the Congo", "the Niger", "the Zambezi", "the Amazon", "the Danube",
           "the Volga", "the Mekong", "the Rhine", "the Thames", "the Ganges")
_SEAS = ("the Pacific", "the Atlantic", "the Indian Ocean", "the Arctic", "the Southern Ocean",
         "the Caspian Sea", "the Baltic Sea", "the Red Sea", "the Black Sea", "the North Sea",
         "the Coral Sea")
MIN_ALTERNATIVES = 10

# (subject phrase, value per common knowledge, pool of values; the document never states the known one)
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
    ("the chemical symbol for gold", "Au", ("Ag", "Fe", "Pb", "Sn", "Cu", "Zn", "Hg", "Pt", "Ni", "Al")),
    (
        "the boiling point of water at sea level in degrees Celsius",
        "100",
        ("60", "70", "80", "90", "110", "120", "130", "140", "150", "200"),
    ),
    ("the number of legs of a spider", "8", ("2", "4", "5", "6", "7", "9", "10", "12", "14", "16")),
    ("the longest river in Africa", "the Nile", _RIVERS),
    ("the largest ocean on Earth", "the Pacific", _SEAS),
    (
        "the currency of Japan",
        "the yen",
        ("the peso", "the krona", "the rupee", "the franc", "the euro", "the dollar", "the pound",
         "the won", "the lira", "the rand"),
    ),
)
COUNTERFACTUAL_QUESTION = "According to the document, what is {subject}?"

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
    question = COUNTERFACTUAL_QUESTION.format(subject=COMMON_FACTS[chosen[0]][0])
    return TaskSpec(
        family="grounding",
        task="counterfactual",
        question=question,
        question_template=question,  # the subject is the question: its values have their own pool
        answer=value,
        needles=[needle],
        decoys=decoys,
    )


def _fact(ctx: TaskContext, registry: FactRegistry, subject: str, relation: str) -> tuple[str, str]:
    """A fact about ``subject`` with a fresh object: (object, sentence)."""
    obj = ctx.names.person()
    registry.add(subject, relation, obj)
    return obj, fact_sentence(ctx, subject, relation, obj)


def make_unanswerable(ctx: TaskContext) -> TaskSpec:
    """A one-hop relation question; with probability ``ctx.unanswerable_share`` its fact is absent.

    Needles: the person's two facts (the asked one first when present), then the asked relation
    of someone else, so that the relation word alone gives nothing away.
    """
    rng, registry = ctx.rng, FactRegistry()
    person = ctx.names.person()
    asked, *others = rng.sample(RELATIONS, 3)
    answerable = rng.random() >= ctx.unanswerable_share
    answer, needles = UNANSWERABLE, []
    for relation in [asked, others[0]] if answerable else others:
        obj, sentence = _fact(ctx, registry, person, relation)
        needles.append(sentence)
        answer = obj if relation == asked else answer
    needles.append(_fact(ctx, registry, ctx.names.person(), asked)[1])
    decoys = [_fact(ctx, registry, ctx.names.person(), rng.choice(RELATIONS))[1]
              for _ in range(ctx.num_decoys - 1)]
    return TaskSpec(
        family="grounding",
        task="unanswerable",
        question=chain_question(person, [asked]),
        question_template=chain_template(1),
        answer=answer,
        needles=needles,
        decoys=decoys,
    )
