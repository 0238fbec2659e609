"""Long-form synthesis: gather every item of a kind spread over the document.

* ``list_items``: name every item of one kind (set-valued answer, items joined by ``"; "``);
* ``count_items``: how many distinct items of that kind are named, uniform over
  :data:`ITEM_COUNTS` (six values, so no count is right more than 1/6 of the time a priori);
* ``sum_values``: total quantity one guild delivered of one good, over two to five deliveries of
  20..2,400 crates each (totals spread over thousands of values).
Decoys use the same sentence shapes with other kinds, other goods or other guilds.
"""

from __future__ import annotations

from .. import words
from .spec import TaskContext, TaskSpec

ITEM_TEMPLATES = (
    "Among the holdings is a {kind} called {name}.",
    "The inventory records a {kind} named {name}.",
    "Visitors often asked about a {kind} known as {name}.",
)
ITEM_COUNTS = range(2, 8)
LIST_QUESTION = "List every {kind} named in the document, separated by semicolons."
COUNT_QUESTION = "How many different {kind}s are named in the document?"
SUM_QUESTION = "In total, how many crates of {good} did the {guild} guild deliver?"
DELIVERY_TEMPLATES = (
    "The {guild} guild delivered {amount} crates of {good} {time}.",
    "{Time}, the {guild} guild delivered {amount} crates of {good}.",
)


def _items(ctx: TaskContext, kind: str, count: int) -> tuple[list[str], list[str]]:
    names = [ctx.names.item() for _ in range(count)]
    sentences = [ctx.rng.choice(ITEM_TEMPLATES).format(kind=kind, name=name) for name in names]
    return names, sentences


def _item_task(ctx: TaskContext) -> tuple[str, list[str], list[str], list[str]]:
    kind, *other_kinds = ctx.rng.sample(words.ITEM_KINDS, 3)
    names, needles = _items(ctx, kind, ctx.rng.choice(ITEM_COUNTS))
    decoys: list[str] = []
    for other in other_kinds:
        decoys += _items(ctx, other, max(1, ctx.num_decoys // 2))[1]
    return kind, names, needles, decoys


def make_list_items(ctx: TaskContext) -> TaskSpec:
    """Ask for every item of one kind; answer joins the names with "; "."""
    kind, names, needles, decoys = _item_task(ctx)
    return TaskSpec(
        family="synthesis",
        task="list_items",
        question=LIST_QUESTION.format(kind=kind),
        question_template=LIST_QUESTION,
        answer="; ".join(names),
        needles=needles,
        decoys=decoys,
    )


def make_count_items(ctx: TaskContext) -> TaskSpec:
    """Ask how many items of one kind are named."""
    kind, names, needles, decoys = _item_task(ctx)
    return TaskSpec(
        family="synthesis",
        task="count_items",
        question=COUNT_QUESTION.format(kind=kind),
        question_template=COUNT_QUESTION,
        answer=str(len(names)),
        needles=needles,
        decoys=decoys,
    )


def _delivery(ctx: TaskContext, guild: str, good: str, amount: int) -> str:
    time = ctx.rng.choice(words.TIMES)
    return ctx.rng.choice(DELIVERY_TEMPLATES).format(
        guild=guild, good=good, amount=f"{amount:,}", time=time, Time=time.capitalize()
    )


def make_sum_values(ctx: TaskContext) -> TaskSpec:
    """Ask for the total one guild delivered of one good (amounts may be written with commas)."""
    rng = ctx.rng
    guild, *other_guilds = rng.sample(words.GUILDS, 3)
    good, *other_goods = rng.sample(words.GOODS, 3)
    amounts = [rng.randint(20, 2400) for _ in range(rng.randint(2, 5))]
    needles = [_delivery(ctx, guild, good, amount) for amount in amounts]
    decoys = []
    for _ in range(ctx.num_decoys):
        if rng.random() < 0.5:
            decoys.append(_delivery(ctx, guild, rng.choice(other_goods), rng.randint(20, 2400)))
        else:
            decoys.append(_delivery(ctx, rng.choice(other_guilds), good, rng.randint(20, 2400)))
    return TaskSpec(
        family="synthesis",
        task="sum_values",
        question=SUM_QUESTION.format(good=good, guild=guild),
        question_template=SUM_QUESTION,
        answer=str(sum(amounts)),
        needles=needles,
        decoys=decoys,
    )
