"""RULER rows as evaluation items: prompts as the suite measured them, one table row per task.

Prompts are the user message ``document + "\\n\\n" + question`` chat-formatted, without the
project's answer-format instruction (RULER's own templates say what to answer). Scores are
RULER's: the ``ruler_*`` reward of the task on the whole response (a ``<think>`` block dropped;
after an ``Answer:`` line only what follows it), :data:`SCORING`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from ..answers import AnswerFormat
from ..chat import ChatTokenizer
from ..evaluate import NO_DEPTH, EvalItem, eval_item
from ..longblocks import LongBlocksExample, build_user_message
from ..rewards import RewardConfig
from .suite import FAMILY, RulerGenerator

SCORING = RewardConfig(answer_format=AnswerFormat(fallback="full"))


def item_from_row(example: LongBlocksExample) -> EvalItem:
    """A loaded RULER row (``answer_instruction=False``) as an item whose family is its task."""
    item = eval_item(example)
    return dataclasses.replace(item, family=item.task or item.family)


def generated_items(generator: RulerGenerator, tokenizer: ChatTokenizer) -> Iterator[EvalItem]:
    """The generator's suite as items, cell by cell (nothing written to disk)."""
    for length, task in generator.cells():
        for example in generator.cell_examples(length, task):
            depth = example.needle_depth_target
            yield EvalItem(
                id=example.id,
                prompt_ids=tuple(tokenizer.prompt_ids(
                    build_user_message(example.document, example.question, None))),
                reference=example.answer, task=task, family=task, length_bucket=example.length_bucket,
                depth=NO_DEPTH if depth is None else f"{depth:g}")


def is_ruler_row(example: LongBlocksExample) -> bool:
    return example.metadata.get("task_family") == FAMILY
