"""Asynchronous rollouts: the vLLM engine samples the next step's batch while the trainer trains.

``rollout.async_mode`` (:class:`~megatron_dgrpo.train.config.RolloutConfig`):

============  ===========================================================================
``sync``      (default) each batch is sampled after the previous update
              (:class:`~megatron_dgrpo.train.vllm_rollouts.VLLMRollouts` alone)
``one_step``  step ``n + 1``'s batch is sampled during step ``n`` with the weights step ``n``
              started from: from step 2 on every batch is one update old
``bounded``   the same, but the engine is refitted only when the next batch would be more
              than ``rollout.max_staleness`` (``k``) updates old, i.e. every ``k``-th step:
              staleness cycles through 1..k and ``k - 1`` of every ``k`` refits are saved
============  ===========================================================================

**Versions.** Version ``v`` is the student after ``v`` training steps (0 at start-up, ``n``
after resuming at step ``n``); step ``n`` (1-based) trains from version ``n - 1``. A sample of
step ``n`` drawn with version ``v`` has staleness ``n - 1 - v`` (logged per step over the
global batch: ``rollout/staleness_mean``, ``rollout/staleness_max``; every sample of a batch
comes from one version, ``rollout/weight_version``).

**Schedule** (all ranks in lockstep; each replica's engine on the replica's leader, in a
process of its own so that it samples while the trainer computes):

1. :meth:`AsyncRollouts.generate` (step ``n``): wait for batch ``n`` (sampled in the
   background since step ``n - 1``; sampled now when none is in flight: step 1, or a resume
   from a synchronous checkpoint) and broadcast it over the replica; launch batch ``n + 1``
   on the engine's current weights in a background thread of the leader, for the examples
   of step ``n + 1`` read ahead from the example stream
   (:class:`~megatron_dgrpo.data.mix.Lookahead`); return batch ``n``.
2. :meth:`AsyncRollouts.after_step` (step ``n``, the trainer now at version ``n``): the batch
   launched next (``n + 2``) trains from version ``n + 1``; if the engine's version ``e``
   would make it too stale (``n + 1 - e > k``), wait for the batch in flight, refit the
   engine to version ``n`` and verify it (``VLLMRollouts.after_step``: every
   ``verify_every``-th step that refits), and record the engine's weight fingerprint.

Refits happen only between two background generations, so every batch is sampled by one
version, recorded with it as a :class:`BatchOrigin`: the version and the per-tensor norms of
the engine's weight fingerprint (:func:`~megatron_dgrpo.rollout.verify.engine_weight_digest`,
read through the engine's own layers), which identify the weights that sampled the batch.

**The loss.** The engine's log-probs of the sampled tokens (``StepBatch.rollout_logp``) are
the behaviour policy; the trainer's ``pi_old`` is the proximal policy (with one update per
step, the training forward's detached log-probs: the weights being trained; with
``ppo_mini_batches`` / ``ppo_epochs`` > 1 a no-grad forward before the updates). The
objectives' existing truncated importance weight ``min(pi_old / pi_behaviour, loss.tis_cap)``
times the clipped surrogate of ``pi / pi_old`` is then the decoupled PPO objective (Hilton
et al. 2021; AReaL's async loss), with the behaviour weight truncated (AReaL drops the
tokens above its cap instead).

**Checkpoints.** :meth:`AsyncRollouts.state_dict` waits for the batch in flight and saves it
(every replica's: response ids, log-probs, finish reasons, texts, as JSON, whose floats
round-trip exactly), after refitting the engine if it lags the trainer (``bounded``), so a
resumed engine, started from the checkpoint's weights, holds the version the uninterrupted
one holds. The example stream's saved state excludes the examples read ahead; the resumed
trainer takes them again and the saved batch must answer them (by example id). The
schedule does not depend on ``steps``: the last step launches a batch too, so a finished run
extended later equals the longer run.

**Failures.** An exception in a background generation is raised on every rank at the next
wait (:class:`RolloutEngineError`, naming the replica, the step and the reason), after every
rank has learnt every replica's outcome, so no rank waits forever for another.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from megatron_dgrpo.data.longblocks import LongBlocksExample
from megatron_dgrpo.parallel.collectives import (
    all_gather_objects,
    broadcast_object,
    gather_objects,
)
from megatron_dgrpo.rollout.engine import Rollout, RolloutBatch
from megatron_dgrpo.rollout.verify import engine_weight_digest
from megatron_dgrpo.train.batch import StepBatch
from megatron_dgrpo.train.vllm_rollouts import VLLMRollouts


POLL_SECONDS = 1.0  # how often a wait for the engine checks that its process lives


class RolloutEngineError(RuntimeError):
    """An engine failed while sampling a batch in the background."""


def in_background(function: Callable, *args) -> Future:
    """``function(*args)`` in a daemon thread of its own (a thread blocked on a dead engine
    never holds up the interpreter's exit); its result or exception in the future."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(function(*args))
        except BaseException as exc:  # handed to the waiting thread
            future.set_exception(exc)

    threading.Thread(target=run, name="dgrpo-rollouts", daemon=True).start()
    return future


@dataclass(frozen=True)
class BatchOrigin:
    """The weights that sampled a batch: ``version`` (the student after that many steps) and
    ``fingerprint``, HF tensor name -> norm of the engine's weight fingerprint at the time
    (on the replica's leader; empty on its other ranks)."""

    version: int
    fingerprint: dict[str, float] = field(default_factory=dict)


@dataclass
class _Pending:
    """The batch of ``step`` sampled ahead: in flight (``future``, on the leader), collected
    (``rollouts``, on every rank of the replica) or restored from a checkpoint (``saved``,
    rollouts without their prompt ids, which the examples give back)."""

    step: int
    origin: BatchOrigin
    example_ids: list[str]
    future: Future | None = None
    rollouts: RolloutBatch | None = None
    saved: dict | None = None


def _encode(rollouts: RolloutBatch) -> dict:
    """A :class:`RolloutBatch` as JSON-ready lists (prompt ids left out: the examples hold
    them)."""
    return {"seconds": rollouts.seconds,
            "rollouts": [{"prompt_index": r.prompt_index, "response_ids": r.response_ids,
                          "logprobs": r.logprobs, "finish_reason": r.finish_reason,
                          "text": r.text} for r in rollouts.rollouts]}


def _decode(saved: dict, examples: list[LongBlocksExample]) -> RolloutBatch:
    """:func:`_encode`'s inverse, the prompt ids taken from ``examples``."""
    return RolloutBatch([Rollout(prompt_ids=list(examples[r["prompt_index"]].prompt_ids), **r)
                         for r in saved["rollouts"]], saved["seconds"])


class AsyncRollouts:
    """A :class:`~megatron_dgrpo.train.sources.SequenceSource` sampling one step ahead with
    ``source``'s engines (see the module docstring); call every method on every rank.

    Args:
        source: the synchronous vLLM rollouts (engine start, sampling, refit, verification).
        max_staleness: ``k``: the most updates a batch may lag the weights it trains (1:
            ``one_step``).
        upcoming: this rank's examples of the step after the one just taken, read ahead
            without consuming them (``Trainer._take_examples(ahead=True)``).
    """

    def __init__(self, source: VLLMRollouts, max_staleness: int,
                 upcoming: Callable[[], list[LongBlocksExample]]):
        if max_staleness < 1:
            raise ValueError(f"max_staleness must be >= 1, got {max_staleness}")
        self.source, self.max_staleness, self.upcoming = source, max_staleness, upcoming
        self.replica = source.replica
        self.engine_version: int | None = None  # the version the engine holds, once started
        self.origin: BatchOrigin | None = None  # of the batches the engine samples next
        self.consumed: BatchOrigin | None = None  # of the batch generate returned last
        self.trained = 0  # the last step whose update is done
        self._pending: _Pending | None = None

    # ------------------------------------------------------------------ per step

    def generate(self, examples: list[LongBlocksExample], step: int,
                 draw: int = 0) -> tuple[StepBatch, dict[str, float]]:
        """Batch ``step`` (sampled ahead, or now if none is), after launching the next one;
        metrics: staleness, weight version, seconds waited for the engine."""
        if draw:
            raise RuntimeError("asynchronous rollouts sample one round per step; "
                               "dynamic_sampling.mode=drop is refused at config validation")
        _, metrics = self.source.serving_engine()
        if self.engine_version is None:
            self._engine_holds(step - 1)
        if self._pending is None:
            self._launch(step, examples)
        pending = self._pending
        if pending.step != step:
            raise RuntimeError(f"the batch sampled ahead is step {pending.step}'s, the trainer "
                               f"asks for step {step}'s")
        waited = self._collect()
        if pending.example_ids != [e.id for e in examples]:
            raise ValueError(
                f"the batch sampled ahead for step {step} answers examples "
                f"{pending.example_ids[:3]}..., the trainer took "
                f"{[e.id for e in examples][:3]}...: data or prompts_per_step changed since "
                "the checkpoint was saved?")
        rollouts = pending.rollouts or _decode(pending.saved, examples)
        self._pending, self.consumed = None, pending.origin
        self._launch(step + 1, self.upcoming())
        staleness = float(step - 1 - pending.origin.version)  # the same for every sample
        metrics.update({"rollout/weight_version": float(pending.origin.version),
                        "rollout/staleness_mean": staleness, "rollout/staleness_max": staleness,
                        "time/rollout_wait_s": waited})
        return self.source.step_batch(examples, rollouts), metrics

    def after_step(self, step: int) -> dict[str, float]:
        """Refit (and verify) the engine if the next batch it launches would otherwise be
        more than ``max_staleness`` updates old; metrics of the refit."""
        self.trained = step
        if step + 1 - self.engine_version <= self.max_staleness:
            return {}
        return self._refit(step)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """The batch in flight, every replica's (the dict is complete on global rank 0)."""
        self._collect()
        if self.engine_version is not None and self.engine_version < self.trained:
            self._refit(self.trained)  # the resumed engine starts from these weights
        pending = self._pending
        if pending is None:
            return {}
        mine = pending.saved if pending.rollouts is None else _encode(pending.rollouts)
        entry = {"example_ids": pending.example_ids, "fingerprint": pending.origin.fingerprint,
                 "rollouts": mine}
        gathered = gather_objects((self.replica.index, entry) if self.replica.is_leader
                                  else None, dst=0) or []
        replicas = dict(part for part in gathered if part is not None)
        return {"step": pending.step, "version": pending.origin.version,
                "replicas": [replicas[i] for i in sorted(replicas)]}

    def load_state_dict(self, state: dict) -> None:
        """Restore the batch :meth:`state_dict` saved (``{}``: none was in flight)."""
        if not state:
            return
        replicas = state["replicas"]
        if self.replica.index >= len(replicas):
            raise ValueError(f"the checkpoint holds batches sampled ahead by {len(replicas)} "
                             f"replica(s); this run has more (replica {self.replica.index})")
        entry = replicas[self.replica.index]
        fingerprint = entry["fingerprint"] if self.replica.is_leader else {}
        self._pending = _Pending(state["step"], BatchOrigin(state["version"], fingerprint),
                                 entry["example_ids"], saved=entry["rollouts"])
        self.trained = state["step"] - 1

    # ------------------------------------------------------------------ internals

    def _engine_holds(self, version: int) -> None:
        """Record that the engine now samples with ``version`` (and its fingerprint)."""
        self.engine_version = version
        fingerprint = {}
        if self.replica.is_leader:
            fingerprint = engine_weight_digest(self.source.engine, self.source.model_config)
        self.origin = BatchOrigin(version, fingerprint)

    def _refit(self, step: int) -> dict[str, float]:
        self._collect()  # the engine must be idle
        metrics = self.source.after_step(step)
        self._engine_holds(step)
        return metrics

    def _launch(self, step: int, examples: list[LongBlocksExample]) -> None:
        """Start sampling batch ``step`` of ``examples`` in the background (leader)."""
        future = None
        if self.replica.is_leader:
            future = in_background(self.source.sample, examples, step, 0)
        self._pending = _Pending(step, self.origin, [e.id for e in examples], future)

    def _collect(self) -> float:
        """Wait for the batch in flight (if any) and broadcast it over the replica; every
        rank learns every replica's outcome and raises :class:`RolloutEngineError` if one
        failed. Returns the longest wait of any leader (seconds)."""
        pending = self._pending
        if pending is None or pending.rollouts is not None or pending.saved is not None:
            return 0.0
        started, rollouts, error = time.perf_counter(), None, None
        if pending.future is not None:
            try:
                rollouts = self._wait(pending.future)
            except Exception as exc:  # reported to every rank below, then raised
                error = exc
        waited = time.perf_counter() - started
        reason = None if error is None else f"{type(error).__name__}: {error}"
        outcomes = all_gather_objects((self.replica.index, reason, waited))
        failed = [(index, why) for index, why, _ in outcomes if why is not None]
        if failed:
            self._pending = None
            index, why = failed[0]
            raise RolloutEngineError(
                f"replica {index}'s vLLM engine failed while sampling step {pending.step}'s "
                f"rollouts in the background: {why}. Training stopped") from error
        pending.rollouts = broadcast_object(rollouts, src=self.replica.leader,
                                            group=self.replica.group)
        pending.future = None
        return max(wait for _, _, wait in outcomes)

    def _wait(self, future: Future) -> RolloutBatch:
        """The background generation's result, checking every :data:`POLL_SECONDS` that the
        engine's process is alive (its death raises here instead of waiting forever)."""
        while True:
            try:
                return future.result(timeout=POLL_SECONDS)
            except FutureTimeout:
                self.source.engine.check_alive()
