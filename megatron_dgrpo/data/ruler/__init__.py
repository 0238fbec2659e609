"""A RULER-compatible long-context suite, generated offline (RULER: Hsieh et al., 2024).

Task rules follow RULER's published generators (written anew here): :mod:`.niah`,
:mod:`.variable_tracking`, :mod:`.aggregation`, :mod:`.qa`; haystacks, depths and the length fit in
:mod:`.haystack`; the suite and its length rule in :mod:`.suite`; files in :mod:`.writer`; the
paper-style table in :mod:`.report`. Scoring: ``ruler_match_all`` / ``ruler_match_part`` in
:mod:`..rewards` (RULER's ``string_match_all`` / ``string_match_part``).
"""

from .suite import DEFAULT_LENGTHS, QA_TASKS, SYNTHETIC_TASKS, TASK_NAMES, RulerConfig, RulerExample, RulerGenerator

__all__ = ["DEFAULT_LENGTHS", "QA_TASKS", "SYNTHETIC_TASKS", "TASK_NAMES", "RulerConfig", "RulerExample",
           "RulerGenerator"]
