"""Argument parsing and entry points for ``dgrpo data synth``, ``dgrpo data ruler``, ``dgrpo data
prepare``, ``dgrpo data baseline`` and the data side of ``dgrpo eval`` (``--suite``:
:mod:`.suites`).

The ``dgrpo`` console script adds these arguments to its sub-parsers and calls ``run_*``, which
return a process exit code (0 success, 2 bad arguments or refused output). ``dgrpo eval`` owns
the model: it adds :func:`add_eval_data_arguments` to its parser, builds a
``generate(prompt_ids) -> responses`` callable from ``--checkpoint`` and calls
:func:`evaluate_from_args`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from ..outputs import OutputExistsError
from .synth import SynthConfig, parse_length

if TYPE_CHECKING:
    from .evaluate import EvalTable, Generate


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dgrpo data synth``."""
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--num", type=int, required=True, help="number of examples")
    parser.add_argument("--lengths", default="1k,4k,16k", help="document lengths in tokens, e.g. 1k,4k,16k")
    parser.add_argument(
        "--tasks",
        default="multihop,grounding,synthesis,document",
        help="task or family names, comma-separated",
    )
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]")
    parser.add_argument("--hops", default="1,2,3,4", help="multi-hop chain lengths (1..4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--unanswerable-share",
        type=float,
        default=SynthConfig.unanswerable_share,
        help="share of `unanswerable` questions whose fact is absent (default 1/3; the rest are answerable)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="HF tokenizer dir or sentencepiece .model to count tokens (default: approximation)",
    )
    parser.add_argument("--shard-size", type=int, default=1000, help="examples per parquet shard")
    parser.add_argument("--workers", type=int, default=1, help="generator processes")


def progress_bar():
    """A rich progress bar (description, bar, done / total, elapsed) for the commands."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=not sys.stderr.isatty(),
    )


def run_synth(args: argparse.Namespace) -> int:
    """Generate synthetic data as configured by :func:`add_synth_arguments`."""
    from .synth.writer import write_synth_dataset

    try:
        config = SynthConfig(
            num_examples=args.num,
            lengths=tuple(parse_length(x) for x in _csv(args.lengths)),
            tasks=tuple(_csv(args.tasks)),
            depths=tuple(float(x) for x in _csv(args.depths)),
            hops=tuple(int(x) for x in _csv(args.hops)),
            seed=args.seed,
            tokenizer=args.tokenizer,
            unanswerable_share=args.unanswerable_share,
        )
        config.validate()
        with progress_bar() as progress:
            bar = progress.add_task("synth", total=config.num_examples)
            shards = write_synth_dataset(
                config,
                args.out,
                args.shard_size,
                args.workers,
                on_shard_done=lambda n: progress.advance(bar, n),
            )
    except (OutputExistsError, ValueError) as error:
        print(f"dgrpo data synth: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {config.num_examples} examples in {len(shards)} shards to {args.out}")
    return 0


def add_ruler_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dgrpo data ruler`` (the RULER-compatible suite as parquet files)."""
    from .suites import add_ruler_options

    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--tokenizer", default=None,
                        help="the model's tokenizer (HF dir or sentencepiece .model) to measure lengths "
                             "(default: the approximate counter)")
    add_ruler_options(parser, lengths_default="4k,8k,16k,32k,64k,128k")


def run_ruler(args: argparse.Namespace) -> int:
    """Generate the RULER suite as configured by :func:`add_ruler_arguments`."""
    from .ruler.writer import write_ruler_suite
    from .suites import ruler_config

    try:
        config = ruler_config(args)
        total = len(config.lengths) * len(config.task_names) * config.num_per_task
        with progress_bar() as progress:
            bar = progress.add_task("ruler", total=total)
            files = write_ruler_suite(config, args.out, on_example=lambda: progress.advance(bar))
    except (OutputExistsError, ValueError) as error:
        print(f"dgrpo data ruler: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {total} examples ({len(config.task_names)} tasks x {len(config.lengths)} lengths x "
          f"{config.num_per_task}) in {len(files)} files to {args.out}")
    return 0


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dgrpo data prepare`` (LongBlocks parquet -> filtered, tokenized shards)."""
    parser.add_argument("--data", nargs="+", required=True, help="LongBlocks parquet files or directories")
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer dir or sentencepiece .model")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--split", default="train", choices=("train", "validation", "all"))
    parser.add_argument("--validation-fraction", type=float, default=0.01)
    parser.add_argument(
        "--languages", default="", help="comma-separated language codes to keep (default all)"
    )
    parser.add_argument("--sources", default="", help="comma-separated sources to keep (default all)")
    parser.add_argument("--min-prompt-tokens", type=int, default=0)
    parser.add_argument("--max-prompt-tokens", type=int, default=32768)
    parser.add_argument("--shard-size", type=int, default=1000, help="examples per output shard")


def run_prepare(args: argparse.Namespace) -> int:
    """Filter and tokenize LongBlocks shards as configured by :func:`add_prepare_arguments`."""
    from .chat import load_chat_tokenizer
    from .longblocks import LongBlocksConfig
    from .prepare import prepare_longblocks

    try:
        config = LongBlocksConfig(
            paths=tuple(args.data),
            split=args.split,
            validation_fraction=args.validation_fraction,
            languages=tuple(_csv(args.languages)),
            sources=tuple(_csv(args.sources)),
            min_prompt_tokens=args.min_prompt_tokens,
            max_prompt_tokens=args.max_prompt_tokens,
        )
        config.validate()
        summary = prepare_longblocks(config, load_chat_tokenizer(args.tokenizer), args.out, args.shard_size)
    except (OutputExistsError, ValueError) as error:
        print(f"dgrpo data prepare: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary.to_dict()))
    return 0


def add_baseline_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dgrpo data baseline`` (the no-context baseline of a data set, no model)."""
    parser.add_argument("--fit", nargs="+", required=True, help="training parquet files or directories")
    parser.add_argument("--data", nargs="+", required=True, help="held-out parquet files or directories")
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer dir or sentencepiece .model")
    parser.add_argument("--max-prompt-tokens", type=int, default=131072)


def run_baseline(args: argparse.Namespace) -> int:
    """Print what answering ``--data`` from its questions alone scores, per task and per family."""
    from .baseline import NoContextBaseline, read_fit_rows, task_markdown
    from .chat import load_chat_tokenizer
    from .evaluate import eval_item
    from .longblocks import LongBlocksConfig, LongBlocksLoader
    from .rewards import RewardConfig

    try:
        baseline = NoContextBaseline.fit(read_fit_rows(args.fit), fit_on="--fit " + " ".join(args.fit))
        config = LongBlocksConfig(paths=tuple(args.data), split="all",
                                  max_prompt_tokens=args.max_prompt_tokens)
        items = [eval_item(e) for e in LongBlocksLoader(config, load_chat_tokenizer(args.tokenizer))]
        scores = baseline.score(items, RewardConfig())
    except ValueError as error:
        print(f"dgrpo data baseline: error: {error}", file=sys.stderr)
        return 2
    print(f"no-context baseline fit on {scores.fit_on}, scored on {len(items)} rows of --data\n")
    print(task_markdown(scores.table.scored))
    print(scores.table.to_markdown())
    return 0


def add_eval_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The data options of ``dgrpo eval`` (the caller adds ``--checkpoint`` and engine options)."""
    from .suites import SUITES, add_ruler_options

    parser.add_argument("--suite", default="longblocks", choices=SUITES,
                        help="what to score (see megatron_dgrpo/data/suites.py); default longblocks")
    parser.add_argument(
        "--data", nargs="+", default=None,
        help="files or directories to evaluate on (parquet; LongBench / short-context JSON(L)); "
             "--suite ruler without --data generates the suite")
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer dir or sentencepiece .model")
    parser.add_argument("--report-dir", required=True, help="new directory for scores.md/json, heatmap.png")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate() call")
    parser.add_argument("--max-prompt-tokens", type=int, default=131072,
                        help="longer prompts are skipped (LongBlocks, RULER files) or cut in the middle (LongBench)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N usable rows")
    add_ruler_options(parser.add_argument_group("--suite ruler"), lengths_default=None)
    parser.add_argument(
        "--baseline-data",
        nargs="+",
        default=None,
        help="training parquet files or directories to fit the no-context baseline on "
        "(default: fit it on the evaluated data itself, leave-one-out, labelled in-sample)",
    )


def evaluate_from_args(args: argparse.Namespace, generate: Generate) -> EvalTable:
    """Read ``--suite``'s data, generate with ``generate(prompt_ids) -> responses`` (token
    ids of the chat-formatted prompts), write and return the table (with the no-context
    baseline of ``--baseline-data``, or an in-sample one, beside the model)."""
    from .baseline import NoContextBaseline, read_fit_rows
    from .chat import load_chat_tokenizer
    from .evaluate import evaluate_items
    from .suites import plan_suite
    from ..outputs import refuse_existing

    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be positive, got {args.limit}")
    refuse_existing(args.report_dir)
    baseline = None
    if args.baseline_data:
        fit_on = "--baseline-data " + " ".join(args.baseline_data)
        baseline = NoContextBaseline.fit(read_fit_rows(args.baseline_data), fit_on=fit_on)
    plan = plan_suite(args, load_chat_tokenizer(args.tokenizer))
    table = evaluate_items(plan.items, generate, plan.scorer, out_dir=args.report_dir,
                           batch_size=args.batch_size, summaries=plan.summaries,
                           baseline=baseline)
    print(table.to_markdown())
    for name, text in (plan.summaries(table) if plan.summaries else {}).items():
        if name.endswith(".md"):
            print(text)
    if plan.note:
        print(plan.note())
    return table
