"""Document-level understanding: which section states a fact, and the order of dated events.

* ``section_lookup``: the answer is the number of the section holding the stated fact; the fact
  goes to a uniformly drawn section (every document has at least four), and decoys state the same
  kind of fact about the same place with another material, or about other places.
* ``event_order``: four numbered events carry years in the text (not in document order); the
  answer lists their numbers from earliest to latest, e.g. ``"3, 1, 4, 2"``.
"""

from __future__ import annotations

from .. import words
from .spec import TaskContext, TaskSpec

REBUILT_TEMPLATE = "The {institution} at {place} was rebuilt with {material}."
EVENT_TEMPLATE = "In {year}, {clause}."
NUM_EVENTS = 4
SECTION_QUESTION = (
    "Which section of the document states that the {institution} at {place} was rebuilt with "
    "{material}? Give the section number."
)
ORDER_QUESTION = (
    "Order these events from earliest to latest: {listing}. Give the event numbers separated by commas."
)


def make_section_lookup(ctx: TaskContext) -> TaskSpec:
    """Ask which section states a fact; a decoy states the same place with another material."""
    rng = ctx.rng
    institution = rng.choice(words.INSTITUTIONS)
    place = ctx.names.word()
    material, other_material = rng.sample(words.MATERIALS, 2)
    fact = REBUILT_TEMPLATE.format(institution=institution, place=place, material=material)
    decoys = [REBUILT_TEMPLATE.format(institution=institution, place=place, material=other_material)]
    for _ in range(ctx.num_decoys):
        decoys.append(
            REBUILT_TEMPLATE.format(
                institution=rng.choice(words.INSTITUTIONS),
                place=ctx.names.word(),
                material=rng.choice(words.MATERIALS),
            )
        )
    return TaskSpec(
        family="document",
        task="section_lookup",
        question=SECTION_QUESTION.format(institution=institution, place=place, material=material),
        question_template=SECTION_QUESTION,
        answer="",
        needles=[fact],
        decoys=decoys,
        answer_is_section=True,
    )


def _event_clause(ctx: TaskContext) -> str:
    action = ctx.rng.choice(words.EVENT_VERBS).format(
        place=ctx.names.word(), institution=ctx.rng.choice(words.INSTITUTIONS)
    )
    return f"{ctx.names.person()} {action}"


def make_event_order(ctx: TaskContext) -> TaskSpec:
    """Ask for the chronological order of four numbered, dated events; decoy events carry other years."""
    rng = ctx.rng
    years = rng.sample(range(1600, 1990), NUM_EVENTS + ctx.num_decoys)
    clauses = [_event_clause(ctx) for _ in years]
    needles = [EVENT_TEMPLATE.format(year=y, clause=c) for y, c in zip(years[:NUM_EVENTS], clauses)]
    decoys = [
        EVENT_TEMPLATE.format(year=y, clause=c) for y, c in zip(years[NUM_EVENTS:], clauses[NUM_EVENTS:])
    ]
    listing = "; ".join(f"({i + 1}) {clause}" for i, clause in enumerate(clauses[:NUM_EVENTS]))
    chronological = sorted(range(NUM_EVENTS), key=lambda i: years[i])
    return TaskSpec(
        family="document",
        task="event_order",
        question=ORDER_QUESTION.format(listing=listing),
        question_template=ORDER_QUESTION.format(
            listing="; ".join(f"({i + 1}) {{event}}" for i in range(NUM_EVENTS))
        ),
        answer=", ".join(str(i + 1) for i in chronological),
        needles=needles,
        decoys=decoys,
    )
