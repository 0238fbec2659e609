"""Task families of the synthetic generator and the registry that names them.

Task -> family: multihop -> multihop; counterfactual, unanswerable -> grounding;
list_items, count_items, sum_values -> synthesis; section_lookup, event_order -> document.
"""

from __future__ import annotations

from collections.abc import Callable

from .document_level import make_event_order, make_section_lookup
from .grounding import make_counterfactual, make_unanswerable
from .multihop import make_multihop
from .spec import UNANSWERABLE, TaskContext, TaskSpec
from .synthesis import make_count_items, make_list_items, make_sum_values

TASK_MAKERS: dict[str, Callable[[TaskContext], TaskSpec]] = {
    "multihop": make_multihop,
    "counterfactual": make_counterfactual,
    "unanswerable": make_unanswerable,
    "list_items": make_list_items,
    "count_items": make_count_items,
    "sum_values": make_sum_values,
    "section_lookup": make_section_lookup,
    "event_order": make_event_order,
}
TASK_FAMILIES: dict[str, tuple[str, ...]] = {
    "multihop": ("multihop",),
    "grounding": ("counterfactual", "unanswerable"),
    "synthesis": ("list_items", "count_items", "sum_values"),
    "document": ("section_lookup", "event_order"),
}


def resolve_tasks(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Expand family names to their tasks, keep task names, drop repeats; ValueError on unknowns."""
    resolved: list[str] = []
    for name in names:
        expanded = TASK_FAMILIES.get(name, (name,))
        for task in expanded:
            if task not in TASK_MAKERS:
                known = sorted({*TASK_MAKERS, *TASK_FAMILIES})
                raise ValueError(f"unknown task {name!r}; known tasks and families: {', '.join(known)}")
            if task not in resolved:
                resolved.append(task)
    return tuple(resolved)


__all__ = ["TASK_MAKERS", "TASK_FAMILIES", "UNANSWERABLE", "TaskContext", "TaskSpec", "resolve_tasks"]
