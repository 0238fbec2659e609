"""Evaluation: score generations per task family x length bucket x needle depth (RULER-style).

Generation is a callable ``generate(prompts: list[list[int]]) -> list[str]`` taking the
chat-formatted prompts as token ids (``LongBlocksExample.prompt_ids``: never re-encoded from text,
so a document's special-token literals stay text), so any engine plugs in (the embedded Megatron
engine, vLLM, or a test oracle). Scores come from a scorer ``score(item, response) -> float in
[0, 1]``: by default :class:`~.rewards.RewardConfig` (per-task reward, answer extraction); suites
with their own metrics (:mod:`.longbench`) bring theirs. They are reported as percentages (mean
score x 100). Items are generated in batches of similar prompt length (:func:`length_batches`),
results kept in the items' order.

Outputs of :func:`write_report`: ``scores.json`` (every cell with its count and mean),
``scores.md`` (family x length table with averages, then depth x length), ``heatmap.png``
(depth x length, one panel per family plus "all"), ``predictions.jsonl`` (one line per item:
its keys, reference, response and score, for error analysis). ``all`` rows and columns pool the items
(a micro-average), weighting each cell by its number of items. Rows without synthetic metadata
(public LongBlocks data) are grouped as family ``longblocks:<source>``, bucketed by prompt length
to the next power of two, with depth ``n/a``.

Every table carries a no-context baseline (:mod:`.baseline`: the most frequent answer of a fit
set per task and question template, scored by the same rewards), fit on training data when one is
given and on the evaluated items themselves otherwise (leave-one-out, labelled in-sample):
``scores.md`` adds a ``baseline`` column beside each family's ``all`` score and says what it was
fit on; ``scores.json`` carries its cells under ``"baseline"`` (``null`` when turned off).
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .longblocks import LongBlocksExample
from ..outputs import atomic_output_dir, refuse_existing
from .rewards import RewardConfig
from .synth.length import format_length, parse_length

if TYPE_CHECKING:
    from .baseline import NoContextBaseline

Generate = Callable[[list[list[int]]], list[str]]
ALL = "all"
NO_DEPTH = "n/a"


@dataclass(frozen=True)
class EvalItem:
    """One prompt to answer and where it falls in the breakdown (``template``: the question
    template of synthetic rows, None for public ones)."""

    id: str
    prompt_ids: tuple[int, ...]
    reference: str
    task: str | None
    family: str
    length_bucket: str
    depth: str
    template: str | None = None


def length_bucket_of(num_tokens: int) -> str:
    """Next power of two at or above ``num_tokens`` as a label, e.g. 3000 -> ``"4k"``."""
    return format_length(1 << max(0, math.ceil(math.log2(max(1, num_tokens)))))


def family_of(metadata: dict, source: str) -> str:
    """A row's task family: synthetic metadata's, else ``longblocks:<source>``."""
    return metadata.get("task_family") or f"longblocks:{source}"


def eval_item(example: LongBlocksExample) -> EvalItem:
    """The breakdown keys of a loaded example (synthetic metadata if present)."""
    meta = example.metadata
    depth = meta.get("needle_depth_target")
    return EvalItem(
        id=example.id,
        prompt_ids=tuple(example.prompt_ids),
        reference=example.reference_answer,
        task=meta.get("task"),
        family=family_of(meta, example.source),
        length_bucket=meta.get("length_bucket") or length_bucket_of(example.num_prompt_tokens),
        depth=NO_DEPTH if depth is None else f"{depth:g}",
        template=meta.get("question_template"),
    )


Scorer = Callable[[EvalItem, str], float]


def reward_scorer(rewards: RewardConfig) -> Scorer:
    """Score an item's response with ``rewards`` (its per-task reward and answer extraction)."""
    rewards.validate()
    return lambda item, response: rewards.score(response, item.reference, item.task)


# Items are answered in windows of this many batches: each window sorted by prompt length, so a
# batch holds prompts of similar length (less padding), while at most one window's prompts are
# held in memory (a 100K-token prompt is ~3.6 MB of Python ints).
SORT_WINDOW_BATCHES = 8


def length_batches(lengths: Sequence[int], batch_size: int,
                   window_batches: int = SORT_WINDOW_BATCHES) -> list[list[int]]:
    """The generation batches of items with prompt ``lengths`` (tokens), as item indices.

    Items are taken in windows of ``batch_size x window_batches`` in order; each window is
    sorted by prompt length (ties keep their order) and cut into batches of ``batch_size``
    (the window's last batch may be shorter), each batch in item order. Every index appears
    exactly once. Depends only on the lengths and the sizes, so every caller that splits the
    batches (data-parallel replicas) or streams the windows (:func:`score_items`) generates the
    same batches.
    """
    if batch_size <= 0 or window_batches <= 0:
        raise ValueError(f"batch_size and window_batches must be positive, got {batch_size} "
                         f"and {window_batches}")
    window = batch_size * window_batches
    batches = []
    for start in range(0, len(lengths), window):
        order = sorted(range(start, min(start + window, len(lengths))), key=lengths.__getitem__)
        batches += [sorted(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    return batches


def generate_batches(prompts: Sequence[Sequence[int]], batches: Iterable[list[int]],
                     generate: Generate) -> dict[int, str]:
    """``generate`` called once per batch of prompt indices; index -> response."""
    responses: dict[int, str] = {}
    for batch in batches:
        texts = generate([list(prompts[i]) for i in batch])
        if len(texts) != len(batch):
            raise ValueError(f"generate returned {len(texts)} responses for {len(batch)} prompts")
        responses.update(zip(batch, texts))
    return responses


@dataclass(frozen=True)
class ScoredItem:
    """A model's ``response`` to ``item`` and its reward ``score`` in [0, 1]."""

    item: EvalItem
    response: str
    score: float


def score_items(
    items: Iterable[EvalItem], generate: Generate, rewards: RewardConfig | Scorer, batch_size: int = 16
) -> list[ScoredItem]:
    """Generate in batches of ``batch_size`` prompts of similar length (:func:`length_batches`;
    results in the items' order) and score every response (with a
    :class:`~.rewards.RewardConfig` or a scorer ``score(item, response)``)."""
    score = reward_scorer(rewards) if isinstance(rewards, RewardConfig) else rewards
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    scored: list[ScoredItem] = []
    iterator = iter(items)
    while window := list(itertools.islice(iterator, batch_size * SORT_WINDOW_BATCHES)):
        prompts = [item.prompt_ids for item in window]
        batches = length_batches([len(p) for p in prompts], batch_size)
        responses = generate_batches(prompts, batches, generate)
        scored += [ScoredItem(item, responses[i], score(item, responses[i]))
                   for i, item in enumerate(window)]
    return scored


# named length buckets of other suites, in reading order (LongBench-E ranges, LongBench-v2 classes)
_NAMED_BUCKETS = ("0-4k", "4-8k", "8k+", "short", "medium", "long")


def _bucket_sort_key(label: str) -> tuple[int, str]:
    if label in _NAMED_BUCKETS:
        return (_NAMED_BUCKETS.index(label) - len(_NAMED_BUCKETS), label)
    try:
        return (parse_length(label), label)
    except ValueError:  # "all" and any other label sort last
        return (1 << 62, label)


def depth_sort_key(label: str) -> float:
    return float(label) if label != NO_DEPTH else 2.0


@dataclass(frozen=True)
class Cell:
    """One table cell: ``count`` items, mean reward x 100 (``all`` in a key means pooled over it)."""

    family: str
    length_bucket: str
    depth: str
    count: int
    score: float  # mean reward x 100


@dataclass(frozen=True)
class BaselineScores:
    """A no-context baseline's table on the evaluated items, and what the baseline was fit on."""

    table: EvalTable
    fit_on: str


class EvalTable:
    """Mean scores over every (family, length bucket, depth) cell, with ``all`` marginals, and
    optionally the no-context baseline's scores on the same items."""

    def __init__(self, scored: list[ScoredItem], baseline: BaselineScores | None = None) -> None:
        self.scored = scored
        self.baseline = baseline
        sums: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0.0, 0])
        for s in scored:
            for family in (s.item.family, ALL):
                for length in (s.item.length_bucket, ALL):
                    for depth in (s.item.depth, ALL):
                        entry = sums[(family, length, depth)]
                        entry[0] += s.score
                        entry[1] += 1
        self.cells = {
            key: Cell(*key, count=int(n), score=100.0 * total / n) for key, (total, n) in sums.items()
        }
        self.families = sorted({s.item.family for s in scored})
        self.lengths = sorted({s.item.length_bucket for s in scored}, key=_bucket_sort_key)
        self.depths = sorted({s.item.depth for s in scored}, key=depth_sort_key)

    def score(self, family: str = ALL, length_bucket: str = ALL, depth: str = ALL) -> float | None:
        """Mean score x 100 of a cell, or None if the cell is empty."""
        cell = self.cells.get((family, length_bucket, depth))
        return cell.score if cell else None

    def _sorted_cells(self) -> list[dict]:
        cells = sorted(
            self.cells.values(), key=lambda c: (c.family, _bucket_sort_key(c.length_bucket), c.depth)
        )
        return [asdict(c) for c in cells]

    def to_json(self) -> str:
        baseline = self.baseline
        return json.dumps(
            {
                "families": self.families,
                "length_buckets": self.lengths,
                "depths": self.depths,
                "cells": self._sorted_cells(),
                "baseline": baseline and {"fit_on": baseline.fit_on, "cells": baseline.table._sorted_cells()},
            },
            indent=2,
        )

    def _grid(
        self, title: str, rows: list[str], row_key: Callable[[str], tuple[str, str]], with_baseline: bool
    ) -> list[str]:
        columns = [*self.lengths, ALL]
        tables = [(self, length) for length in columns]
        if with_baseline:
            columns.append("baseline")
            tables.append((self.baseline.table, ALL))
        lines = [f"| {title} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for row in rows:
            family, depth = row_key(row)
            values = [table.score(family, length, depth) for table, length in tables]
            lines.append(f"| {row} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in values) + " |")
        return lines

    def to_markdown(self) -> str:
        """Family x length (RULER style, with the baseline column if any) then depth x length;
        cells are mean reward x 100."""
        with_baseline = self.baseline is not None
        lines = ["### Score by task family and context length", ""]
        lines += self._grid("family", [*self.families, ALL], lambda f: (f, ALL), with_baseline)
        if with_baseline:
            lines += ["", f"baseline: no-context baseline (the most frequent answer per task and question "
                          f"template, no document), fit on {self.baseline.fit_on}"]
        lines += ["", "### Score by needle depth and context length", ""]
        lines += self._grid("depth", [*self.depths, ALL], lambda d: (ALL, d), False)
        return "\n".join(lines) + "\n"

    def save_heatmap(self, path: str | Path) -> None:
        """Depth (rows) x length (columns) heatmaps, one panel per family and one for all."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [*self.families, ALL]
        figure, axes = plt.subplots(
            1, len(panels), figsize=(2.6 * len(panels) + 1.0, 3.6), squeeze=False, layout="constrained"
        )
        for column, (axis, family) in enumerate(zip(axes[0], panels)):
            grid = [[self.score(family, length, depth) for length in self.lengths] for depth in self.depths]
            values = [[math.nan if v is None else v for v in row] for row in grid]
            image = axis.imshow(values, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
            for row_index, row in enumerate(grid):
                for col_index, value in enumerate(row):
                    if value is not None:
                        axis.text(col_index, row_index, f"{value:.0f}", ha="center", va="center", fontsize=8)
            axis.set_title(family)
            axis.set_xticks(range(len(self.lengths)), self.lengths)
            axis.set_yticks(range(len(self.depths)), self.depths if column == 0 else [])
            axis.set_xlabel("context length")
        axes[0][0].set_ylabel("needle depth")
        figure.colorbar(image, ax=axes[0].tolist(), label="score")
        figure.savefig(path, dpi=100)
        plt.close(figure)


def _keys_without_prompt(item: EvalItem) -> dict:
    """The item's fields minus its (possibly 100K-token) prompt."""
    return {key: value for key, value in asdict(item).items() if key != "prompt_ids"}


def write_report(table: EvalTable, out_dir: str | Path, extra: dict[str, str] | None = None) -> dict[str, Path]:
    """Write ``scores.json``, ``scores.md``, ``heatmap.png``, ``predictions.jsonl`` and the
    ``extra`` text files (name -> content, e.g. a suite's own table) as a new directory ``out_dir``.

    The directory appears complete or not at all; an existing non-empty one is refused.
    """
    names = {"json": "scores.json", "markdown": "scores.md", "heatmap": "heatmap.png",
             "predictions": "predictions.jsonl", **{name: name for name in extra or {}}}
    with atomic_output_dir(out_dir) as tmp:
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        (tmp / names["json"]).write_text(table.to_json())
        (tmp / names["predictions"]).write_text("".join(
            json.dumps({**_keys_without_prompt(s.item), "response": s.response, "score": s.score}) + "\n"
            for s in table.scored))
        (tmp / names["markdown"]).write_text(table.to_markdown())
        table.save_heatmap(tmp / names["heatmap"])
    return {kind: Path(out_dir) / name for kind, name in names.items()}


IN_SAMPLE = "the evaluated data itself (in-sample: no fit set was given)"


def evaluate_items(
    items: Iterable[EvalItem],
    generate: Generate,
    scorer: RewardConfig | Scorer | None = None,
    out_dir: str | Path | None = None,
    batch_size: int = 16,
    summaries: Callable[[EvalTable], dict[str, str]] | None = None,
    baseline: NoContextBaseline | None = None,
    in_sample_baseline: bool = True,
) -> EvalTable:
    """Score ``items`` (default scorer: ``RewardConfig()``).

    ``baseline``: a fitted no-context baseline (:mod:`.baseline`) scored beside the model on the
    same items with the same scorer. Without one, a baseline is fit on the evaluated items
    themselves, each item answered leave-one-out and the report labelled in-sample, unless
    ``in_sample_baseline`` is False (then the table has no baseline). With ``out_dir`` the
    report is written there (see :func:`write_report`), with the extra files
    ``summaries(table)`` returns; an existing non-empty ``out_dir`` is refused before anything
    is generated.
    """
    if out_dir is not None:
        refuse_existing(out_dir)
    scorer = scorer or RewardConfig()
    scored = score_items(items, generate, scorer, batch_size)
    if baseline is None and in_sample_baseline and scored:
        from .baseline import NoContextBaseline

        in_sample = NoContextBaseline.fit((s.item for s in scored), fit_on=IN_SAMPLE)
        baseline_scores = in_sample.score([s.item for s in scored], scorer, leave_out=True)
    else:
        baseline_scores = baseline and baseline.score([s.item for s in scored], scorer)
    table = EvalTable(scored, baseline_scores)
    if out_dir is not None:
        write_report(table, out_dir, summaries(table) if summaries else None)
    return table


def evaluate(
    examples: Iterable[LongBlocksExample],
    generate: Generate,
    rewards: RewardConfig | None = None,
    out_dir: str | Path | None = None,
    batch_size: int = 16,
    baseline: NoContextBaseline | None = None,
    in_sample_baseline: bool = True,
) -> EvalTable:
    """Score ``examples`` (e.g. a :class:`~.longblocks.LongBlocksLoader` with ``split="all"``)
    beside a no-context baseline; see :func:`evaluate_items`."""
    return evaluate_items((eval_item(e) for e in examples), generate, rewards, out_dir, batch_size,
                          baseline=baseline, in_sample_baseline=in_sample_baseline)
