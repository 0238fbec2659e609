"""The RULER-compatible suite: which tasks, at which lengths, and the generator that fits each sample.

Thirteen tasks as RULER names them (:data:`TASK_NAMES`): eight needle-in-a-haystack variants
(:mod:`.niah`), variable tracking (:mod:`.variable_tracking`), common and frequent words extraction
(:mod:`.aggregation`) and two QA tasks over documents (:mod:`.qa`, from SQuAD / HotpotQA files the
user brings; without them the suite has the eleven synthetic tasks).

**Length rule** (RULER's): a sample of target length ``L`` satisfies ``prompt tokens +
tokens_to_generate <= L``, where the prompt is the user message ``document + "\\n\\n" + question``
rendered with the tokenizer's chat template, exactly as ``dgrpo eval --suite ruler`` feeds it
(without a tokenizer: the user message under the approximate counter of :mod:`..synth.length`).
The context size (units: haystack sentences, list words, documents) is searched once per task and
length on that cell's first sample (:func:`.haystack.fit_units`) and reused; a later sample that
comes out too long is searched down (RULER does the same), so samples are at most ``L`` and close to it.

**Determinism.** Sample ``i`` of task ``t`` at length ``L`` depends only on (config, t, L, i).
"""

from __future__ import annotations

from collections.abc import Iterator
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..longblocks import build_user_message
from ..rewards import join_references
from ..synth.filler import FillerBank
from ..synth.length import ApproxTokenCounter, TokenizerCounter, format_length
from .aggregation import CommonWordsTask, FrequentWordsTask
from .haystack import fit_units
from .niah import NIAH_TASKS
from .qa import LOADERS, QATask
from .spec import Rendered, RulerTask, TaskContext
from .variable_tracking import VariableTrackingTask

SYNTHETIC_TASKS: dict[str, RulerTask] = {
    **{t.name: t for t in NIAH_TASKS},
    "vt": VariableTrackingTask(),
    "cwe": CommonWordsTask(),
    "fwe": FrequentWordsTask(),
}
QA_TASKS = {"qa_1": "squad", "qa_2": "hotpotqa"}  # task -> file format
TASK_NAMES = (*SYNTHETIC_TASKS, *QA_TASKS)
DEFAULT_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
FAMILY = "ruler"
SOURCE = "ruler"


@dataclass
class RulerConfig:
    """What to generate. ``depths``: None for RULER's random depths, else needle depths in [0, 1]
    that the samples of each (task, length) cycle through. ``qa_files`` maps ``qa_1`` / ``qa_2`` to
    a SQuAD / HotpotQA JSON file; ``tasks`` empty means every task that can be made."""

    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    num_per_task: int = 100
    tasks: tuple[str, ...] = ()
    seed: int = 0
    tokenizer: str | None = None
    depths: tuple[float, ...] | None = None
    qa_files: dict[str, str] = field(default_factory=dict)
    filler_bank_size: int = 20_000

    def validate(self) -> None:
        if not self.lengths or any(length < 128 for length in self.lengths):
            raise ValueError(f"ruler.lengths must be non-empty and each at least 128 tokens, got {self.lengths}")
        if self.num_per_task < 1:
            raise ValueError(f"ruler.num_per_task must be >= 1, got {self.num_per_task}")
        unknown = [t for t in (*self.tasks, *self.qa_files) if t not in TASK_NAMES]
        if unknown:
            raise ValueError(f"ruler.tasks: unknown task(s) {unknown}; known: {', '.join(TASK_NAMES)}")
        missing = [t for t in self.tasks if t in QA_TASKS and t not in self.qa_files]
        if missing:
            raise ValueError(f"ruler.tasks {missing} need their QA file ({', '.join(f'{t}: {QA_TASKS[t]}' for t in missing)}); "
                             "pass it or leave the task out")
        if self.depths is not None and (not self.depths or any(not 0 <= d <= 1 for d in self.depths)):
            raise ValueError(f"ruler.depths must be fractions in [0, 1], got {self.depths}")
        if self.tokenizer is not None and not Path(self.tokenizer).exists():
            raise ValueError(f"ruler.tokenizer {self.tokenizer!r} does not exist")
        if self.filler_bank_size < 1:
            raise ValueError(f"ruler.filler_bank_size must be >= 1, got {self.filler_bank_size}")

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.tasks or (*SYNTHETIC_TASKS, *(t for t in QA_TASKS if t in self.qa_files))


@dataclass(frozen=True)
class RulerExample:
    """One row: the LongBlocks columns plus task metadata (:data:`..schema.RULER_SCHEMA`).

    ``answer`` lists ``references`` one per line; ``num_tokens`` is the prompt's length and
    ``num_tokens + max_new_tokens <= target_tokens``; ``needle_depths`` are the actual depths of
    the needles holding the references (NIAH tasks), ``needle_depth`` the first of them.
    """

    id: str
    document: str
    question: str
    answer: str
    references: list[str]
    task: str
    length_bucket: str
    target_tokens: int
    num_tokens: int
    max_new_tokens: int
    token_counter: str
    hops: int | None = None
    needle_depth: float | None = None
    needle_depth_target: float | None = None
    needle_depths: list[float] = field(default_factory=list)
    needle_section: int | None = None
    question_template: str | None = None  # each RULER task asks in one shape: keyed by the task
    task_family: str = FAMILY
    source: str = SOURCE
    language: str = "en"


class RulerGenerator:
    """Makes the suite's examples; construct once (it loads the tokenizer, filler bank and QA files)."""

    def __init__(self, config: RulerConfig) -> None:
        config.validate()
        self.config = config
        if config.tokenizer is None:
            self._chat = None
            self.counter = ApproxTokenCounter()
        else:
            from ..chat import load_chat_tokenizer

            self._chat = load_chat_tokenizer(config.tokenizer)
            self.counter = TokenizerCounter(self._chat, name=f"tokenizer:{config.tokenizer}")
        self.bank = FillerBank(self.counter, config.seed, config.filler_bank_size)
        self.tasks: dict[str, RulerTask] = {}
        for name in config.task_names:
            if name in QA_TASKS:
                self.tasks[name] = QATask(name, LOADERS[QA_TASKS[name]](config.qa_files[name]))
            else:
                self.tasks[name] = SYNTHETIC_TASKS[name]
        self._units: dict[tuple[str, int], int] = {}

    def prompt_tokens(self, rendered: Rendered) -> int:
        """Tokens of the prompt ``dgrpo eval`` renders for ``rendered`` (see the module docstring)."""
        message = build_user_message(rendered.document, rendered.question, None)
        return self.counter.count(self._chat.render_prompt(message) if self._chat else message)

    def _instance(self, task: RulerTask, length: int, index: int):
        cfg = self.config
        seed = f"{cfg.seed}:{task.name}:{length}:{index}"
        depth = None if cfg.depths is None else cfg.depths[index % len(cfg.depths)]
        context = TaskContext(random.Random(seed), seed, self.counter, self.bank, length, depth)
        return task.instance(context)

    def example(self, task_name: str, length: int, index: int) -> RulerExample:
        task = self.tasks[task_name]
        budget = length - task.tokens_to_generate
        what = f"ruler task {task_name} at {format_length(length)} tokens"

        def measure(instance):
            return lambda n: self.prompt_tokens(instance.render(n))

        key = (task_name, length)
        if key not in self._units:  # fitted once per cell, on its first sample
            probe = self._instance(task, length, 0)
            smallest = measure(probe)(probe.min_units)
            guess = probe.min_units + int(max(0, budget - smallest) / max(probe.tokens_per_unit(), 1e-6))
            self._units[key] = fit_units(measure(probe), budget, guess, probe.min_units, what)
        instance = self._instance(task, length, index)
        units = max(self._units[key], instance.min_units)
        if measure(instance)(units) > budget:
            units = fit_units(measure(instance), budget, units, instance.min_units, what)
        rendered = instance.render(units)
        depths = list(rendered.depths)
        return RulerExample(
            id=f"ruler-{self.config.seed}-{task_name}-{format_length(length)}-{index:05d}",
            document=rendered.document,
            question=rendered.question,
            answer=join_references(rendered.references),
            references=list(rendered.references),
            task=task_name,
            length_bucket=format_length(length),
            target_tokens=length,
            num_tokens=self.prompt_tokens(rendered),
            max_new_tokens=task.tokens_to_generate,
            token_counter=self.counter.name,
            hops=rendered.hops,
            needle_depth=depths[0] if depths else None,
            needle_depth_target=rendered.depth_target,
            needle_depths=depths,
        )

    def fit_cells(self) -> None:
        """Fit every (task, length) cell now: a length too short for a task fails here, before any
        sample is used."""
        for length, task_name in self.cells():
            self.example(task_name, length, 0)

    def cells(self) -> list[tuple[int, str]]:
        """(length, task) pairs in output order."""
        return [(length, name) for length in self.config.lengths for name in self.tasks]

    def cell_examples(self, length: int, task_name: str) -> Iterator[RulerExample]:
        for index in range(self.config.num_per_task):
            yield self.example(task_name, length, index)
