"""Evaluation during training: the run config's ``eval`` section and what runs it.

    eval:
      every: 50              # steps between evaluations (0: none); the last step always
      at_start: true         # also the starting weights, as step 0 (the "base" row)
      suite: longblocks      # or ruler / longbench / short (megatron_dgrpo/data/suites.py)
      data: [data/heldout]   # empty (longblocks only): the validation split of data.paths
      max_examples: 500      # the first N usable items
      max_new_tokens: 64
      batch_size: 16         # prompts per generate call on each data-parallel replica

Every ``every`` steps and after the last one, the current policy answers the held-out set
greedily, with the engine the run already has: each replica's vLLM engine (refitted after the
step) when rollouts come from vLLM, otherwise the embedded engine on the trainer's own model.
Items are batched by prompt length (:func:`~megatron_dgrpo.data.evaluate.length_batches`, the
batches ``dgrpo eval`` makes) and the batches are dealt to the data-parallel replicas in turn;
rank 0 gathers the answers, so the table is the same at any DP size, and the same as ``dgrpo
eval`` of the checkpoint saved at that step (same engine, same batches, same scorer).

Logged (rank 0) into the step's record: ``eval/<family>/<length>`` (mean score x 100; ``all``
pools a family's lengths or a length's families; ``eval/all`` pools everything) and
``time/eval_s``; the cells as the W&B table ``eval/table`` when W&B is on. Each evaluation also
writes ``RUN_DIR/eval/step_NNNNNNNN/``: the report of ``dgrpo eval`` (``scores.md``,
``scores.json``, ``heatmap.png``, ``predictions.jsonl`` and the suite's own table, e.g.
``ruler.md`` with the paper's row). The no-context baseline (:mod:`~megatron_dgrpo.data.
baseline`, fit on the training rows, scored on the held-out set) is logged once per run, with
its first evaluation, as ``eval_baseline/<family>`` and ``eval_baseline/all``; the reports
carry it as their ``baseline`` column.

At start-up, before any model is built, the held-out set is loaded and checked: a set that is
empty or shares an id with the training rows (:mod:`~megatron_dgrpo.data.heldout`) is refused.
An evaluation due when a pre-emption signal arrives is skipped (the checkpoint comes first).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_dgrpo.data.chat import ChatTokenizer, reply_text
from megatron_dgrpo.rollout.engine import RolloutEngine, SamplingParams

if TYPE_CHECKING:
    from megatron_dgrpo.data.evaluate import BaselineScores, EvalItem, EvalTable, Generate
    from megatron_dgrpo.train.config import RunConfig
    from megatron_dgrpo.train.loop import Trainer
    from megatron_dgrpo.train.metrics import MetricsLogger

log = logging.getLogger(__name__)
EVAL_DIR = "eval"


@dataclass
class EvalConfig:
    """The run config's ``eval`` section (see the module docstring). ``max_prompt_tokens``:
    longer prompts are skipped (LongBlocks, RULER) or cut in the middle (LongBench); None:
    ``data.max_prompt_tokens``."""

    every: int = 0
    at_start: bool = False
    suite: str = "longblocks"
    data: list[str] = field(default_factory=list)
    max_examples: int | None = None
    max_prompt_tokens: int | None = None
    max_new_tokens: int = 64
    batch_size: int = 16

    def validate(self) -> None:
        from megatron_dgrpo.data.suites import SUITES

        if self.every < 0:
            raise ValueError(f"eval.every must be >= 0 (0 = no evaluation), got {self.every}")
        if self.suite not in SUITES:
            raise ValueError(f"eval.suite must be one of {', '.join(SUITES)}, got {self.suite!r}")
        if self.suite != "longblocks" and not self.data:
            raise ValueError(f"eval.suite={self.suite} needs eval.data (files; for RULER the "
                             f"output of `dgrpo data ruler`)")
        for name in ("max_examples", "max_prompt_tokens", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"eval.{name} must be >= 1, got {value}")

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def prompt_limit(self, run: RunConfig) -> int:
        """Longest held-out prompt in tokens."""
        return self.max_prompt_tokens or run.data.max_prompt_tokens

    def check_run(self, run: RunConfig) -> None:
        """What the evaluation needs from the rest of the run (called by ``RunConfig.validate``)."""
        if not self.enabled:
            return
        if run.parallel.context_parallel > 1 and not run.uses_vllm_rollouts():
            raise ValueError("eval with parallel.context_parallel > 1 needs the vLLM rollout "
                             "engine (rollout.engine=vllm, an on-policy objective): the embedded "
                             "engine cannot run a context-parallel model")
        if run.uses_vllm_rollouts():
            engine_len = run.data.max_prompt_tokens + run.sampling.max_new_tokens
            if self.prompt_limit(run) + self.max_new_tokens > engine_len:
                raise ValueError(
                    f"eval answers with the vLLM rollout engine, which holds data.max_prompt_"
                    f"tokens + sampling.max_new_tokens = {engine_len} tokens; eval prompts "
                    f"(eval.max_prompt_tokens = {self.prompt_limit(run)}) + eval.max_new_tokens "
                    f"({self.max_new_tokens}) exceed it: lower them")

    def notices(self) -> list[str]:
        """Options set while evaluation is off, or that the suite does not read."""
        from megatron_dgrpo.config import provided_keys

        provided = provided_keys(self)
        if not self.enabled:
            return [f"eval.{name} has no effect here: eval.every is 0 (no evaluation)"
                    for name in sorted(provided - {"every"})]
        if self.suite == "short" and "max_prompt_tokens" in provided:
            return ["eval.max_prompt_tokens has no effect here: eval.suite=short keeps every "
                    "item whole"]
        return []


# ------------------------------------------------------------------------------ answering


def greedy_generate(engine: RolloutEngine, tokenizer: ChatTokenizer,
                    max_new_tokens: int) -> Generate:
    """``generate(prompt_ids) -> replies`` answering greedily with ``engine`` (the embedded or
    the vLLM engine; one ``generate`` call per batch). Generation stops at the chat template's
    end-of-turn token (when it is one token); the reply is the decoded response up to the
    end-of-turn marker (:func:`~megatron_dgrpo.data.chat.reply_text`), decoded here, so both
    engines' replies come out of the same text."""
    stop = [tokenizer.end_of_turn_id] if tokenizer.end_of_turn_id is not None else []
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=stop)
    params.validate()

    def generate(prompts: list[list[int]]) -> list[str]:
        batch = engine.generate(prompts, params)
        return [reply_text(tokenizer.decode(r.response_ids)) for r in batch.rollouts]

    return generate


def eval_scalars(table: EvalTable) -> dict[str, float]:
    """``eval/<family>/<length>`` for every family and length (``all`` included, depth
    pooled); the overall score is ``eval/all``."""
    from megatron_dgrpo.data.evaluate import ALL

    scalars = {}
    for family in [*table.families, ALL]:
        for length in [*table.lengths, ALL]:
            value = table.score(family, length)
            if value is not None:
                key = "eval/all" if family == length == ALL else f"eval/{family}/{length}"
                scalars[key] = value
    return scalars


def baseline_scalars(table: EvalTable) -> dict[str, float]:
    """``eval_baseline/<family>`` (all lengths) for every family, and ``eval_baseline/all``."""
    from megatron_dgrpo.data.evaluate import ALL

    return {f"eval_baseline/{family}": table.score(family) for family in [*table.families, ALL]}


def table_rows(table: EvalTable) -> tuple[list[str], list[list]]:
    """The table's family x length cells (``all`` included) as columns and rows (W&B)."""
    from megatron_dgrpo.data.evaluate import ALL

    baseline = table.baseline.table if table.baseline is not None else None
    rows = []
    for family in [*table.families, ALL]:
        for length in [*table.lengths, ALL]:
            cell = table.cells.get((family, length, ALL))
            if cell is not None:
                rows.append([family, length, cell.count, cell.score,
                             baseline.score(family, length) if baseline else None])
    return ["family", "length", "items", "score", "baseline"], rows


# ------------------------------------------------------------------------------ held-out set


def _suite_args(config: RunConfig) -> argparse.Namespace:
    """The arguments :func:`~megatron_dgrpo.data.suites.plan_suite` reads, from ``eval``."""
    section = config.eval
    return argparse.Namespace(
        suite=section.suite, data=list(section.data),
        max_prompt_tokens=section.prompt_limit(config),
        limit=section.max_examples, lengths=None, checkpoint=Path(config.run_dir).name)


def _held_out(config: RunConfig, tokenizer: ChatTokenizer):
    """Items, scorer, report summaries and a loader note of the held-out set: ``eval.data``
    through the suite's plan (as ``dgrpo eval`` reads it), or the validation split of
    ``data.paths``, prompted as the training rows are."""
    from megatron_dgrpo.data.evaluate import eval_item
    from megatron_dgrpo.data.longblocks import LongBlocksLoader
    from megatron_dgrpo.data.rewards import RewardConfig
    from megatron_dgrpo.data.suites import plan_suite

    section = config.eval
    if section.data:
        plan = plan_suite(_suite_args(config), tokenizer)
        return list(plan.items), plan.scorer, plan.summaries, plan.note
    data = dataclasses.replace(config.data, split="validation", target="reference",
                               max_prompt_tokens=section.prompt_limit(config))
    loader = LongBlocksLoader(data, tokenizer)
    items = list(itertools.islice((eval_item(e) for e in loader), section.max_examples))
    return items, RewardConfig(), None, lambda: f"LongBlocks rows: {loader.summary.format()}"


class InTrainingEvaluation:
    """The held-out set of a run and its evaluations (see the module docstring). Build it with
    :meth:`prepare` before the trainer, then call :meth:`start` once the trainer is built and
    :meth:`after_step` after every step, on every rank."""

    def __init__(self, config: RunConfig, tokenizer: ChatTokenizer, items: list[EvalItem],
                 scorer, summaries, baseline: BaselineScores | None):
        self.config, self.tokenizer = config, tokenizer
        self.items, self.scorer, self.summaries, self.baseline = items, scorer, summaries, baseline
        self.lengths = [len(item.prompt_ids) for item in items]
        self.batches: list[list[int]] = []  # this replica's, set by start()
        self.baseline_due = False  # rank 0: log the baseline with the next evaluation

    @classmethod
    def prepare(cls, config: RunConfig) -> InTrainingEvaluation | None:
        """Load the held-out set and refuse it if it is empty or shares an id with the training
        rows; fit the no-context baseline on those rows. None when ``eval.every`` is 0."""
        from megatron_dgrpo.data.baseline import NoContextBaseline
        from megatron_dgrpo.data.chat import load_chat_tokenizer
        from megatron_dgrpo.data.heldout import read_training_rows

        if not config.eval.enabled:
            return None
        tokenizer = load_chat_tokenizer(config.tokenizer)
        items, scorer, summaries, note = _held_out(config, tokenizer)
        where = ("eval.data " + " ".join(config.eval.data) if config.eval.data
                 else "the validation split of data.paths")
        if not items:
            raise ValueError(f"eval: the held-out set ({where}) has no usable items"
                             + (f" ({note()})" if note else ""))
        training = read_training_rows(config.data)
        shared = [item.id for item in items if item.id in training.ids]
        if shared:
            raise ValueError(
                f"eval: {len(shared)} of the {len(items)} held-out items ({where}) share their "
                f"id with training rows of data.paths (split {config.data.split}), e.g. "
                f"{shared[0]!r}: evaluate on rows the run does not train on")
        baseline = None
        if training.fit_rows:
            fitted = NoContextBaseline.fit(training.fit_rows,
                                           fit_on="the training rows of data.paths")
            baseline = fitted.score(items, scorer)
        log.info("eval: %d held-out items (%s)%s", len(items), where,
                 f"; {note()}" if note else "")
        return cls(config, tokenizer, items, scorer, summaries, baseline)

    # ----------------------------------------------------------------------- schedule

    def start(self, trainer: Trainer, logger: MetricsLogger | None) -> None:
        """Deal the batches to this replica; with ``eval.at_start`` on a fresh run, evaluate the
        starting weights as step 0."""
        from megatron_dgrpo.data.evaluate import length_batches
        from megatron_dgrpo.train.metrics import read_metrics

        batches = length_batches(self.lengths, self.config.eval.batch_size)
        self.batches = batches[trainer.dp_rank::trainer.dp_size]
        mine = {i for batch in self.batches for i in batch}
        self.items = [item if i in mine else dataclasses.replace(item, prompt_ids=())
                      for i, item in enumerate(self.items)]  # keep only the prompts we answer
        # logged once per run: with this process's first evaluation unless a record has it
        self.baseline_due = logger is not None and self.baseline is not None and not any(
            key.startswith("eval_baseline/") for r in read_metrics(logger.run_dir) for key in r)
        if trainer.step == 0 and self.config.eval.at_start:
            metrics = self.evaluate(trainer, logger)
            if logger is not None:
                logger.log(0, metrics)

    def due(self, step: int) -> bool:
        return step % self.config.eval.every == 0 or step == self.config.steps

    def after_step(self, trainer: Trainer, logger: MetricsLogger | None,
                   stopping: bool) -> dict[str, float]:
        """The evaluation's metrics (rank 0; ``{}`` elsewhere) when ``trainer.step`` is due and
        no pre-emption is ``stopping`` the run, else ``{}``."""
        if stopping or not self.due(trainer.step):
            return {}
        return self.evaluate(trainer, logger)

    # ----------------------------------------------------------------------- one evaluation

    def _engine(self, trainer: Trainer) -> tuple[RolloutEngine | None, dict[str, float]]:
        """This rank's engine (None where another rank of the replica answers) and start-up
        metrics. Collective: call on every rank."""
        from megatron_dgrpo.rollout.embedded import EmbeddedEngine
        from megatron_dgrpo.train.vllm_rollouts import VLLMRollouts

        if isinstance(trainer.sequences, VLLMRollouts):
            return trainer.sequences.serving_engine()
        return EmbeddedEngine(trainer.student, trainer.model_config.vocab_size,
                              decode=self.tokenizer.decode), {}

    def evaluate(self, trainer: Trainer, logger: MetricsLogger | None) -> dict[str, float]:
        """Answer the held-out set with the current weights; on rank 0 write the step's report,
        log the W&B table and return the scalars ({} on other ranks). Call on every rank."""
        from megatron.core import parallel_state as ps

        from megatron_dgrpo.data.evaluate import (EvalTable, ScoredItem, generate_batches,
                                                  reward_scorer)
        from megatron_dgrpo.data.rewards import RewardConfig
        from megatron_dgrpo.parallel.collectives import gather_objects, world_rank

        started = time.perf_counter()
        engine, metrics = self._engine(trainer)
        # the replica's lowest rank reports (its TP peers answered the same batches with it)
        speaks = ps.get_tensor_model_parallel_rank() == 0 and trainer.cp_rank == 0
        answered = []
        if engine is not None:
            generate = greedy_generate(engine, self.tokenizer, self.config.eval.max_new_tokens)
            responses = generate_batches([item.prompt_ids for item in self.items], self.batches,
                                         generate)
            if speaks:
                score = (reward_scorer(self.scorer) if isinstance(self.scorer, RewardConfig)
                         else self.scorer)
                answered = [(i, text, score(self.items[i], text)) for i, text in responses.items()]
        parts = gather_objects(answered, dst=0)
        if world_rank() != 0:
            return {}
        scored = [ScoredItem(self.items[i], text, value)
                  for i, text, value in sorted(itertools.chain.from_iterable(parts))]
        table = EvalTable(scored, self.baseline)
        self._write_report(table, trainer.step)
        if logger is not None:
            logger.log_table(trainer.step, "eval/table", *table_rows(table))
        metrics.update(eval_scalars(table))
        if self.baseline_due:
            metrics.update(baseline_scalars(self.baseline.table))
            self.baseline_due = False
        metrics["time/eval_s"] = time.perf_counter() - started
        return metrics

    def _write_report(self, table: EvalTable, step: int) -> None:
        """``RUN_DIR/eval/step_NNNNNNNN/`` (a step redone after a resume replaces its report)."""
        from megatron_dgrpo.data.evaluate import write_report

        out = Path(self.config.run_dir) / EVAL_DIR / f"step_{step:08d}"
        if out.exists():
            shutil.rmtree(out)
        write_report(table, out, self.summaries(table) if self.summaries else None)


__all__ = ["EvalConfig", "InTrainingEvaluation", "eval_scalars", "greedy_generate"]
