"""Which items ``dgrpo eval --suite`` scores, how, and which suite table it adds to the report.

============ ==============================================================================
longblocks   LongBlocks-schema parquet (``--data``; public or ``dgrpo data synth``), rewards per task
ruler        the RULER suite: files of ``dgrpo data ruler`` (``--data``) or generated on the fly at
             ``--lengths`` with the model's tokenizer; RULER's scores; adds ``ruler.md`` / ``ruler.json``
longbench    LongBench / LongBench-E / LongBench-v2 files (``--data``); LongBench's metrics; adds
             ``longbench.md`` / ``longbench.json``
short        plain JSONL short-context items (``--data``, :mod:`.short_context`); each row's metric
============ ==============================================================================
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .chat import ChatTokenizer
from .evaluate import EvalItem, EvalTable, Scorer, eval_item
from .rewards import RewardConfig

SUITES = ("longblocks", "ruler", "longbench", "short")


@dataclass
class SuitePlan:
    """Items to score, the scorer, extra report files ``summaries(table)`` and a line to print after."""

    items: Iterable[EvalItem]
    scorer: RewardConfig | Scorer
    summaries: Callable[[EvalTable], dict[str, str]] | None = None
    note: Callable[[], str] | None = None


def _need_data(args: argparse.Namespace) -> tuple[str, ...]:
    if not args.data:
        raise ValueError(f"--suite {args.suite} needs --data FILE [FILE ...]")
    return tuple(args.data)


def _longblocks(args, tokenizer: ChatTokenizer, answer_instruction: bool = True):
    from .longblocks import LongBlocksConfig, LongBlocksLoader

    config = LongBlocksConfig(paths=_need_data(args), split="all", max_prompt_tokens=args.max_prompt_tokens,
                              answer_instruction=answer_instruction)
    return LongBlocksLoader(config, tokenizer)


def _ruler(args, tokenizer: ChatTokenizer) -> SuitePlan:
    from .ruler.evaluation import SCORING, generated_items, is_ruler_row, item_from_row
    from .ruler.report import ruler_files
    from .ruler.suite import RulerGenerator

    label = Path(getattr(args, "checkpoint", None) or "model").name
    lengths = set(ruler_config(args).lengths) if args.lengths else None
    if args.data:
        loader = _longblocks(args, tokenizer, answer_instruction=False)
        items = (item_from_row(e) for e in loader
                 if is_ruler_row(e) and (lengths is None or e.metadata.get("target_tokens") in lengths))
        return SuitePlan(items, SCORING, lambda t: ruler_files(t, label), lambda: f"RULER rows: {loader.summary.format()}")
    generator = RulerGenerator(ruler_config(args))
    generator.fit_cells()
    return SuitePlan(generated_items(generator, tokenizer), SCORING, lambda t: ruler_files(t, label))


def _longbench(args, tokenizer: ChatTokenizer) -> SuitePlan:
    from .longbench import load_longbench, longbench_files, longbench_score

    return SuitePlan(load_longbench(_need_data(args), tokenizer, args.max_prompt_tokens), longbench_score,
                     longbench_files)


def _short(args, tokenizer: ChatTokenizer) -> SuitePlan:
    from .short_context import load_short_context, short_context_scorer

    return SuitePlan(load_short_context(_need_data(args), tokenizer), short_context_scorer())


def plan_suite(args: argparse.Namespace, tokenizer: ChatTokenizer) -> SuitePlan:
    """The plan for ``args.suite`` (files are read and checked here, before any generation)."""
    if args.suite == "longblocks":
        loader = _longblocks(args, tokenizer)
        plan = SuitePlan((eval_item(e) for e in loader), RewardConfig(),
                         note=lambda: f"LongBlocks rows: {loader.summary.format()}")
    else:
        plan = {"ruler": _ruler, "longbench": _longbench, "short": _short}[args.suite](args, tokenizer)
    if args.limit is not None:
        plan.items = itertools.islice(plan.items, args.limit)
    return plan


def add_ruler_options(parser: argparse.ArgumentParser, lengths_default: str | None) -> None:
    """The RULER generation options shared by ``dgrpo data ruler`` and ``dgrpo eval --suite ruler``."""
    parser.add_argument("--lengths", default=lengths_default,
                        help="RULER target lengths in tokens, e.g. 4k,8k,16k,32k,64k,128k")
    parser.add_argument("--num-per-task", type=int, default=100, help="RULER samples per task and length")
    parser.add_argument("--seed", type=int, default=0, help="RULER generation seed")
    parser.add_argument("--ruler-tasks", default="", help="RULER tasks, comma-separated (default: all that can be made)")
    parser.add_argument("--depths", default="ruler",
                        help="needle depths in [0, 1], comma-separated, or 'ruler' (RULER's random depths)")
    parser.add_argument("--qa-squad", default=None, help="SQuAD 2.0 JSON for RULER's qa_1")
    parser.add_argument("--qa-hotpot", default=None, help="HotpotQA distractor JSON for RULER's qa_2")


def ruler_config(args: argparse.Namespace):
    """A :class:`~.ruler.RulerConfig` from :func:`add_ruler_options`' arguments (validated)."""
    from .ruler import DEFAULT_LENGTHS, RulerConfig
    from .synth.length import parse_length

    def csv(text: str) -> list[str]:
        return [part.strip() for part in text.split(",") if part.strip()]

    config = RulerConfig(
        lengths=tuple(parse_length(x) for x in csv(args.lengths)) if args.lengths else DEFAULT_LENGTHS,
        num_per_task=args.num_per_task, tasks=tuple(csv(args.ruler_tasks)), seed=args.seed,
        tokenizer=getattr(args, "tokenizer", None),
        depths=None if args.depths.strip() == "ruler" else tuple(float(x) for x in csv(args.depths)),
        qa_files={t: f for t, f in (("qa_1", args.qa_squad), ("qa_2", args.qa_hotpot)) if f})
    config.validate()
    return config
