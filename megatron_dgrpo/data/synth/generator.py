"""Deterministic generation of synthetic long-context examples.

Example ``i`` of a run depends only on (config, i): its task, length and needle depth cycle through
the grid ``tasks x lengths x depths`` (task fastest, so every cell is equally filled), multi-hop
examples cycle through ``hops``, and its random stream is seeded by ``"{seed}:{i}"``. Workers can
therefore generate any index range independently; the output does not depend on how work was split.

Two exceptions to the depth grid keep answers unpredictable from the question: ``section_lookup``
puts its fact in a uniformly drawn section (a controlled depth would fix the section), and its
``needle_depth_target`` is the configured depth nearest to where the fact landed.

Lengths are measured: ``num_tokens`` is the whole document counted by the token counter and
``length_bucket`` the power of two nearest it (:func:`~.length.nearest_bucket`), so a document
whose task content does not fit its target is labelled by the length it has.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .document import DocumentBuilder, Needle
from .filler import FillerBank
from .length import ApproxTokenCounter, TokenCounter, TokenizerCounter, nearest_bucket
from .tasks import TASK_MAKERS, TaskContext, resolve_tasks
from .tasks.spec import DEFAULT_UNANSWERABLE_SHARE
from .words import NameFactory

SOURCE = "synthetic"
LANGUAGE = "en"


@dataclass
class SynthConfig:
    """What to generate. Lengths are in tokens; depths are fractions of the document (see document.py)."""

    num_examples: int = 1000
    lengths: tuple[int, ...] = (1024, 4096, 16384)
    tasks: tuple[str, ...] = ("multihop", "grounding", "synthesis", "document")
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    hops: tuple[int, ...] = (1, 2, 3, 4)
    seed: int = 0
    tokenizer: str | None = None  # path to an HF tokenizer dir or a sentencepiece .model; None: approx
    filler_bank_size: int = 20_000
    tokens_per_section: int = 512
    unanswerable_share: float = DEFAULT_UNANSWERABLE_SHARE  # of the ``unanswerable`` task's questions

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        if self.num_examples <= 0:
            raise ValueError(f"synth.num_examples must be positive, got {self.num_examples}")
        if not self.lengths or any(length < 64 for length in self.lengths):
            raise ValueError(
                f"synth.lengths must be non-empty and each at least 64 tokens, got {self.lengths}"
            )
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"synth.depths must be non-empty fractions in [0, 1], got {self.depths}")
        if not self.hops or any(not 1 <= h <= 4 for h in self.hops):
            raise ValueError(f"synth.hops must be non-empty values in 1..4, got {self.hops}")
        if self.filler_bank_size <= 0:
            raise ValueError(f"synth.filler_bank_size must be positive, got {self.filler_bank_size}")
        if self.tokens_per_section <= 0:
            raise ValueError(f"synth.tokens_per_section must be positive, got {self.tokens_per_section}")
        if not 0.0 <= self.unanswerable_share <= 1.0:
            raise ValueError(f"synth.unanswerable_share must be in [0, 1], got {self.unanswerable_share}")
        if self.tokenizer is not None and not Path(self.tokenizer).exists():
            raise ValueError(f"synth.tokenizer {self.tokenizer!r} does not exist")
        resolve_tasks(self.tasks)

    @property
    def task_names(self) -> tuple[str, ...]:
        """``tasks`` with family names expanded to their tasks."""
        return resolve_tasks(self.tasks)


@dataclass(frozen=True)
class SynthExample:
    """One generated row: the public LongBlocks columns that apply plus task metadata.

    ``question_template`` is the question with its entity slots abstracted (the no-context
    baseline's key); ``needle_depth`` is the actual depth of the primary needle,
    ``needle_depth_target`` the depth that was asked for (``section_lookup``: the configured depth
    nearest the actual one), ``needle_depths`` the actual depths of all needles (primary first);
    ``num_tokens`` is the document length measured by ``token_counter``, ``length_bucket`` the
    power of two nearest it, ``target_tokens`` the length asked for.
    """

    id: str
    document: str
    question: str
    answer: str
    task_family: str
    task: str
    question_template: str
    hops: int
    length_bucket: str
    target_tokens: int
    num_tokens: int
    needle_depth: float
    needle_depth_target: float
    needle_depths: list[float]
    needle_section: int
    token_counter: str
    source: str = SOURCE
    language: str = LANGUAGE


def make_counter(tokenizer: str | None) -> TokenCounter:
    """The approximate counter, or one backed by the tokenizer at ``tokenizer``."""
    if tokenizer is None:
        return ApproxTokenCounter()
    from ..chat import load_chat_tokenizer

    return TokenizerCounter(load_chat_tokenizer(tokenizer), name=f"tokenizer:{tokenizer}")


class SynthGenerator:
    """Builds examples by index; construct once per process (it builds the filler bank)."""

    def __init__(self, config: SynthConfig, counter: TokenCounter | None = None) -> None:
        config.validate()
        self.config = config
        self.counter = counter or make_counter(config.tokenizer)
        bank = FillerBank(self.counter, config.seed, config.filler_bank_size)
        self.builder = DocumentBuilder(bank, self.counter, config.tokens_per_section)
        # task varies fastest, then length, then depth: every prefix of a run is balanced over tasks
        self._grid = [
            (t, n, d) for d, n, t in itertools.product(config.depths, config.lengths, config.task_names)
        ]

    def example(self, index: int) -> SynthExample:
        cfg = self.config
        task, length, depth = self._grid[index % len(self._grid)]
        # successive multi-hop examples take successive hop counts; each pass over the grid shifts by
        # one, so every (length, depth) cell also sees every hop count
        occurrence, grid_pass = index // len(cfg.task_names), index // len(self._grid)
        hops = cfg.hops[(occurrence + grid_pass) % len(cfg.hops)]
        rng = random.Random(f"{cfg.seed}:{index}")
        context = TaskContext(rng, NameFactory(rng), hops, length, cfg.unanswerable_share)
        spec = TASK_MAKERS[task](context)
        count = len(spec.needles)
        needles = [
            Needle(text, (depth + i / count) % 1.0 if i else depth) for i, text in enumerate(spec.needles)
        ]
        if spec.answer_is_section:
            section = rng.randint(1, self.builder.num_sections(length))
            needles[0] = Needle(spec.needles[0], rng.random(), section)
        decoys = [Needle(text, rng.random()) for text in spec.decoys]
        doc = self.builder.build(rng, length, needles, decoys)
        primary = doc.needles[0]
        if spec.answer_is_section:
            depth = min(cfg.depths, key=lambda d: abs(d - primary.depth))
        return SynthExample(
            id=f"synth-{cfg.seed}-{index:08d}",
            document=doc.text,
            question=spec.question,
            answer=str(primary.section) if spec.answer_is_section else spec.answer,
            task_family=spec.family,
            task=spec.task,
            question_template=spec.question_template,
            hops=spec.hops,
            length_bucket=nearest_bucket(doc.num_tokens),
            target_tokens=length,
            num_tokens=doc.num_tokens,
            needle_depth=primary.depth,
            needle_depth_target=depth,
            needle_depths=[n.depth for n in doc.needles],
            needle_section=primary.section,
            token_counter=self.counter.name,
        )

    def examples(self, start: int, stop: int) -> Iterator[SynthExample]:
        """Examples ``start .. stop-1`` in order."""
        for index in range(start, stop):
            yield self.example(index)
