"""The ``dgrpo`` command: parses arguments and hands over to the module that does the work.

Each sub-command lives in the module that owns it and contributes two functions:
``add_*_arguments(parser)`` and ``run_*(args) -> int``. Those modules import heavy
libraries (Megatron, vLLM) inside ``run_*`` only, so ``dgrpo --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence

# name -> (module, add-arguments function, run function, one-line help)
_COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "train": ("megatron_dgrpo.train.cli", "add_train_arguments", "run_train",
              "train with sft, kd, grpo, opd or dgrpo from a YAML run config"),
    "quickstart": ("megatron_dgrpo.quickstart", "add_quickstart_arguments", "run_quickstart",
                   "the CPU quickstart (no network, no downloaded weights)"),
    "experiment": ("megatron_dgrpo.experiment", "add_experiment_arguments", "run_experiment",
                   "the paper in miniature: SFT, KD, GRPO, OPD, dGRPO over seeds, ablations"),
    "convert": ("megatron_dgrpo.models.cli", "add_convert_arguments", "run_convert",
                "convert checkpoints between Hugging Face and Megatron layouts"),
    "eval": ("megatron_dgrpo.eval_cli", "add_eval_arguments", "run_eval",
             "score a checkpoint on an evaluation suite, greedily (embedded or vLLM engine)"),
    "teacher-cache": ("megatron_dgrpo.train.teacher_cache", "add_cache_arguments", "run_cache",
                      "cache a teacher's top-k log-probs for off-policy KD"),
    "report": ("megatron_dgrpo.report", "add_report_arguments", "run_report",
               "render a run's metrics as PNG curves and a Markdown summary"),
}

# name -> {sub-name: (module, add-arguments function, run function, one-line help)}
_COMMAND_GROUPS: dict[str, tuple[str, dict[str, tuple[str, str, str, str]]]] = {
    "data": ("LongBlocks data: generate, RULER suite, prepare, tokenizer, rebuild documents, "
             "no-context baseline", {
        "synth": ("megatron_dgrpo.data.cli", "add_synth_arguments", "run_synth",
                  "generate LongBlocks-style long-context tasks with checkable answers"),
        "ruler": ("megatron_dgrpo.data.cli", "add_ruler_arguments", "run_ruler",
                  "generate the RULER-compatible suite (13 tasks) at given lengths as parquet"),
        "tokenizer": ("megatron_dgrpo.data.tiny_tokenizer", "add_tokenizer_arguments",
                      "run_tokenizer", "train a small offline BPE tokenizer (CPU runs, tests)"),
        "prepare": ("megatron_dgrpo.data.cli", "add_prepare_arguments", "run_prepare",
                    "filter and tokenize LongBlocks parquet into shards"),
        "teacher-responses": ("megatron_dgrpo.train.teacher_responses",
                              "add_teacher_responses_arguments", "run_teacher_responses",
                              "add a column of a teacher's responses (SFT/KD data.target)"),
        "rebuild-documents": ("megatron_dgrpo.data.rebuild", "add_rebuild_arguments", "run_rebuild",
                              "fill LongBlocks' null Institutional-Books documents from a local "
                              "copy of that collection"),
        "baseline": ("megatron_dgrpo.data.cli", "add_baseline_arguments", "run_baseline",
                     "score a data set's no-context baseline (answers from the questions alone)"),
    }),
}


def _attach(subparsers, name: str, spec: tuple[str, str, str, str]) -> None:
    module_name, add_name, run_name, help_text = spec
    module = importlib.import_module(module_name)
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    getattr(module, add_name)(parser)
    run: Callable[[argparse.Namespace], int] = getattr(module, run_name)
    parser.set_defaults(_run=run)


def build_parser() -> argparse.ArgumentParser:
    """The full ``dgrpo`` argument parser."""
    from megatron_dgrpo import __version__

    parser = argparse.ArgumentParser(
        prog="dgrpo", description="Long-context post-training (SFT, KD, GRPO, OPD, dGRPO) "
                                  "on Megatron-core.")
    parser.add_argument("--version", action="version", version=f"megatron-dgrpo {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, spec in _COMMANDS.items():
        _attach(commands, name, spec)
    for group, (help_text, members) in _COMMAND_GROUPS.items():
        group_parser = commands.add_parser(group, help=help_text, description=help_text)
        group_commands = group_parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND",
                                                     required=True)
        for name, spec in members.items():
            _attach(group_commands, name, spec)
    return parser


# Warnings Megatron prints at import in every process when apex / Transformer Engine are
# absent (and a deprecation notice its own config triggers): expected without CUDA.
_EXPECTED_WITHOUT_CUDA = ("Apex is not installed", "Transformer Engine and Apex are not installed",
                          "full scope is deprecated")


def _quiet_expected_warnings() -> None:
    """Without CUDA, hide :data:`_EXPECTED_WITHOUT_CUDA` here and, via ``PYTHONWARNINGS``,
    in the rank processes this command spawns. With CUDA they stay: there they matter."""
    import torch

    if torch.cuda.is_available():
        return
    for message in _EXPECTED_WITHOUT_CUDA:
        warnings.filterwarnings("ignore", message=re.escape(message))
    inherited = [os.environ["PYTHONWARNINGS"]] if os.environ.get("PYTHONWARNINGS") else []
    os.environ["PYTHONWARNINGS"] = ",".join(
        inherited + [f"ignore:{message}" for message in _EXPECTED_WITHOUT_CUDA])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dgrpo`` console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    _quiet_expected_warnings()
    from megatron_dgrpo.errors import RunFailure

    try:
        return int(args._run(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        # Bad input: one clear line, no traceback.
        print(f"dgrpo {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RunFailure as exc:
        # A fault stopped the run (lost rank, disk, divergence, engine): one line naming it.
        print(f"dgrpo {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
