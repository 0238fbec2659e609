"""Multi-hop: follow a chain of k relations (k = 1..4) between people, with distractor chains.

Facts read "The mentor of A is B." (or one of two paraphrases). Distractors share entities with
the true chain: a wrong turn from every chain member (another relation, continued with the true
remaining relations), a parallel chain with the same relations from another person, and random
facts among decoy people. (subject, relation) pairs are unique, so the walk has one answer.
"""

from __future__ import annotations

from ..words import RELATIONS
from .spec import FactRegistry, TaskContext, TaskSpec

FACT_TEMPLATES = (
    "The {relation} of {subject} is {obj}.",
    "{obj} is the {relation} of {subject}.",
    "For {subject}, the {relation} is {obj}.",
)


def fact_sentence(ctx: TaskContext, subject: str, relation: str, obj: str) -> str:
    """One fact in a randomly chosen paraphrase."""
    return ctx.rng.choice(FACT_TEMPLATES).format(subject=subject, relation=relation, obj=obj)


def chain_question(start: str, relations: list[str]) -> str:
    """``Who is the r_k of the r_(k-1) of ... the r_1 of start?``"""
    phrase = start
    for relation in relations:
        phrase = f"the {relation} of {phrase}"
    return f"Who is {phrase}?"


def chain_template(hops: int) -> str:
    """The question template of a ``hops``-hop chain: ``Who is the {relation} of {person}?`` for 1."""
    return chain_question("{person}", ["{relation}"] * hops)


def add_chain(
    ctx: TaskContext, registry: FactRegistry, start: str, relations: list[str], out: list[str]
) -> None:
    """Add the chain start -r1-> new person -r2-> new person ... to ``registry`` and ``out``."""
    current = start
    for relation in relations:
        nxt = ctx.names.person()
        registry.add(current, relation, nxt)
        out.append(fact_sentence(ctx, current, relation, nxt))
        current = nxt


def make_multihop(ctx: TaskContext) -> TaskSpec:
    """A k-hop chain question (k = ``ctx.hops``); needles[0] is the last hop, which names the answer."""
    rng, registry = ctx.rng, FactRegistry()
    relations = rng.sample(RELATIONS, ctx.hops)
    people = [ctx.names.person() for _ in range(ctx.hops + 1)]
    chain = []
    for i, relation in enumerate(relations):
        registry.add(people[i], relation, people[i + 1])
        chain.append(fact_sentence(ctx, people[i], relation, people[i + 1]))
    decoys: list[str] = []
    for i in range(ctx.hops):
        wrong_turn = rng.choice([r for r in RELATIONS if r != relations[i]])
        add_chain(ctx, registry, people[i], [wrong_turn, *relations[i + 1 :]], decoys)
    add_chain(ctx, registry, ctx.names.person(), relations, decoys)
    for _ in range(ctx.num_decoys):
        add_chain(ctx, registry, ctx.names.person(), [rng.choice(RELATIONS)], decoys)
    return TaskSpec(
        family="multihop",
        task="multihop",
        question=chain_question(people[0], relations),
        question_template=chain_template(ctx.hops),
        answer=people[-1],
        needles=[chain[-1], *chain[:-1]],
        decoys=decoys,
        hops=ctx.hops,
    )
