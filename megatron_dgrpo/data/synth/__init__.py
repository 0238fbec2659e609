"""Offline generator of long-context tasks with program-checkable answers (no downloads).

See :mod:`.generator` for determinism, :mod:`.document` for the needle-depth convention,
:mod:`.length` for how tokens are counted, and :mod:`.tasks` for the task families.
"""

from .generator import SynthConfig, SynthExample, SynthGenerator
from .length import ApproxTokenCounter, TokenCounter, TokenizerCounter, format_length, parse_length
from .tasks import TASK_FAMILIES, TASK_MAKERS, UNANSWERABLE, resolve_tasks

__all__ = [
    "SynthConfig",
    "SynthExample",
    "SynthGenerator",
    "ApproxTokenCounter",
    "TokenCounter",
    "TokenizerCounter",
    "format_length",
    "parse_length",
    "TASK_FAMILIES",
    "TASK_MAKERS",
    "UNANSWERABLE",
    "resolve_tasks",
]
