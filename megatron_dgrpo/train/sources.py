"""Where a step's sequences and teacher signals come from: one interface for each.

**Sequence sources** (:class:`SequenceSource`) turn this rank's examples into a
:class:`~megatron_dgrpo.train.batch.StepBatch` and follow the trainer after its update:

====================  =====================================================================
``FixedSequences``    prompt + reference answer (SFT, KD: off-policy)
``EmbeddedRollouts``  ``sampling.n`` rollouts per prompt from the trainer's own model
                      (:class:`~megatron_dgrpo.rollout.embedded.EmbeddedEngine`); always on
                      the current weights, so ``after_step`` has nothing to do
``VLLMRollouts``      a vLLM engine per model replica; ``after_step`` refits and verifies it
                      (:mod:`megatron_dgrpo.train.vllm_rollouts`)
====================  =====================================================================

**Teacher sources** (:class:`TeacherSource`) give the loss the teacher: ``score`` returns
what is known for the whole batch before the micro-batches (top-k ids and log-probs, target
log-probs), ``outputs`` what each micro-batch's loss reads from a live teacher on the last
pipeline stage (hidden states at the loss positions and output weight, or logits),
``active`` holds the teacher on its device for the micro-batch loop (offload), ``elapsed``
the seconds spent since the last call:

====================  =====================================================================
``MegatronTeacher``   the teacher's Megatron forward (full logits: any KL estimator): per
                      micro-batch at PP = 1; at PP > 1 its own pipeline over the step's
                      micro-batches first (same layout as the student, so its last stage
                      is the student's); optionally offloaded between steps
``CachedTeacher``     top-k log-probs cached on disk (``dgrpo teacher-cache``), for KD
``VLLMTeacher``       top-k and target log-probs from a vLLM engine
                      (:mod:`megatron_dgrpo.train.vllm_teacher`)
====================  =====================================================================

:class:`TokenScorer` scores a batch under a model without grad: the initial policy (the
anchor of GRPO's KL) or the student before its PPO updates (``pi_old``), through the
pipeline schedule at any PP.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from megatron_dgrpo.data.chat import reply_text
from megatron_dgrpo.data.longblocks import LongBlocksExample
from megatron_dgrpo.errors import RunFailure
from megatron_dgrpo.models.forward import (
    StageInput,
    hidden_from_output,
    loss_inputs,
    micro_batch_logp,
    output_weight,
    run_micro_batches,
)
from megatron_dgrpo.rollout.engine import RolloutBatch, SamplingConfig
from megatron_dgrpo.rollout.sequences import SequenceBatch, build_sequences
from megatron_dgrpo.train import faults
from megatron_dgrpo.train.batch import MicroBatch, StepBatch, answer_sequences
from megatron_dgrpo.train.offload import Offloader
from megatron_dgrpo.train.teacher_cache import TeacherTopKCache

logger = logging.getLogger(__name__)


class RolloutError(RunFailure):
    """A rollout engine failed, or answered with other samples than it was asked for."""


def engine_rollouts(engine, prompts: list[list[int]], params, step: int) -> RolloutBatch:
    """``engine.generate(prompts, params)`` at 1-based ``step``; any failure of the engine
    becomes :class:`RolloutError` (the trainer retries those, :mod:`.guards`)."""
    try:
        if faults.fires("rollout.error", step):
            raise RuntimeError(f"injected by {faults.VARIABLE}")
        rollouts = engine.generate(prompts, params)
    except Exception as exc:  # any engine failure: named, retried, then stops the run
        raise RolloutError(f"{type(engine).__name__}.generate failed: "
                           f"{type(exc).__name__}: {exc}") from exc
    if faults.fires("rollout.short", step):
        rollouts = RolloutBatch(rollouts.rollouts[:-1], rollouts.seconds)
    return rollouts


def rollout_seed(run_seed: int, step: int, replica: int, draw: int = 0) -> int:
    """The seed of the rollouts of 1-based ``step`` on data-parallel replica ``replica``
    (``draw``: the generation round within the step)."""
    return run_seed + 7919 * step + replica + 104_729 * draw


def rollout_step_batch(examples: list[LongBlocksExample], rollouts: RolloutBatch,
                       group_size: int, decode, align: int, device) -> StepBatch:
    """A :class:`StepBatch` of ``rollouts`` (grouped by prompt) of ``examples``;
    ``decode``: token ids -> text, for rollouts the engine did not detokenize. Raises
    :class:`RolloutError` unless there are exactly ``group_size`` rollouts per example, in
    order."""
    problem = rollouts.problem(len(examples), group_size)
    if problem is not None:
        raise RolloutError(problem)
    rows = rollouts.rollouts
    sequences = build_sequences([r.prompt_ids for r in rows], [r.response_ids for r in rows],
                                align=align).to(device)
    texts = [r.text if r.text is not None else decode(r.response_ids) for r in rows]
    return StepBatch(
        examples=[examples[r.prompt_index] for r in rows], sequences=sequences,
        group_size=group_size, responses=[reply_text(text) for text in texts],
        response_lengths=[len(r.response_ids) for r in rows],
        truncated=[r.finish_reason == "length" for r in rows],
        rollout_logp=sequences.per_token([r.logprobs for r in rows]),
        generation_seconds=rollouts.seconds)


class SequenceSource(Protocol):
    """What the step reads its sequences from; call every method on every rank."""

    def generate(self, examples: list[LongBlocksExample], step: int,
                 draw: int = 0) -> tuple[StepBatch, dict[str, float]]:
        """This rank's batch of ``examples`` at 1-based ``step`` (``draw``: the generation
        round within the step, for dynamic sampling), and source metrics."""
        ...

    def after_step(self, step: int) -> dict[str, float]:
        """Follow the student's update of ``step`` (e.g. refit an engine); metrics."""
        ...

    def state_dict(self) -> dict:
        """What a checkpoint must keep to resume exactly (work in flight), JSON-serialisable;
        call on every rank (the save's rank 0 writes it)."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s result on every rank (``{}``: nothing was saved)."""
        ...


class Stateless:
    """A :class:`SequenceSource` with nothing in flight between steps. A checkpoint of an
    asynchronous source loaded into one drops its in-flight batch (with a warning): the
    next batch is sampled from the resumed weights instead."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            logger.warning("the checkpoint holds a batch sampled ahead (rollout.async_mode); "
                           "this run samples synchronously and samples that step again")


class FixedSequences(Stateless):
    """Prompt + target answer of each example (SFT, KD); ``prompt_loss``: the loss covers
    the prompt tokens too."""

    def __init__(self, tokenizer, align: int, device: torch.device, prompt_loss: bool = False):
        self.tokenizer, self.align, self.device = tokenizer, align, device
        self.prompt_loss = prompt_loss

    def generate(self, examples: list[LongBlocksExample], step: int,
                 draw: int = 0) -> tuple[StepBatch, dict[str, float]]:
        sequences = answer_sequences(examples, self.tokenizer, self.align,
                                     self.prompt_loss).to(self.device)
        return StepBatch(examples=list(examples), sequences=sequences), {}

    def after_step(self, step: int) -> dict[str, float]:
        return {}


class EmbeddedRollouts(Stateless):
    """Rollouts sampled from the live student by the embedded engine (any TP; every TP rank
    calls with the same examples and gets the same rollouts)."""

    def __init__(self, engine, sampling: SamplingConfig, run_seed: int, replica: int,
                 decode, align: int, device: torch.device):
        self.engine, self.sampling, self.run_seed, self.replica = engine, sampling, run_seed, replica
        self.decode, self.align, self.device = decode, align, device

    def generate(self, examples: list[LongBlocksExample], step: int,
                 draw: int = 0) -> tuple[StepBatch, dict[str, float]]:
        params = self.sampling.params(rollout_seed(self.run_seed, step, self.replica, draw))
        rollouts = engine_rollouts(self.engine, [e.prompt_ids for e in examples], params, step)
        return rollout_step_batch(examples, rollouts, params.n, self.decode, self.align,
                                  self.device), {}

    def after_step(self, step: int) -> dict[str, float]:
        return {}  # the engine samples from the live weights


# ---------------------------------------------------------------------------- teachers


@dataclass
class TeacherScores:
    """The teacher at a batch's loss positions (0 elsewhere), natural-log probabilities of
    its full-vocabulary softmax: ``topk_indices`` int64 / ``topk_logp`` ``[B, T, k]`` (best
    first) and, when known, ``logp`` ``[B, T]`` of the targets."""

    topk_indices: Tensor
    topk_logp: Tensor
    logp: Tensor | None = None


class TeacherSource(Protocol):
    """What the loss reads about the teacher; call every method on every rank."""

    def score(self, batch: StepBatch) -> TeacherScores | None:
        """Signals for the whole batch (``None``: this source gives none)."""
        ...

    def outputs(self, inputs: list[StageInput],
                keeps: list[Tensor]) -> Callable[[int], object] | None:
        """For the micro-batches with model inputs ``inputs`` and loss positions ``keeps``
        (flat int64 indices), a function of the micro-batch index giving its loss inputs,
        called on the last pipeline stage (``None``: this source gives none)."""
        ...

    def active(self) -> contextlib.AbstractContextManager:
        """Hold the teacher ready for the micro-batch loop."""
        ...

    def elapsed(self) -> float:
        """Seconds spent in this source since the previous call."""
        ...


class _Stopwatch:
    """Accumulates the seconds of ``timed`` blocks; :meth:`elapsed` reads and resets."""

    def __init__(self) -> None:
        self._seconds = 0.0

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._seconds += time.perf_counter() - started

    def elapsed(self) -> float:
        seconds, self._seconds = self._seconds, 0.0
        return seconds


class MegatronTeacher(_Stopwatch):
    """The frozen teacher's Megatron forward (``fused``: final hidden states at the loss
    positions ``[M, H_teacher]`` and the output weight; otherwise masked logits ``[B, T,
    V_local]``), in host memory between steps with ``offload`` (CUDA only; a no-op on CPU).

    At PP = 1 each micro-batch's outputs are computed when the student's forward of that
    micro-batch starts, so only one micro-batch's exist at a time. At PP > 1 the teacher's
    pipeline runs over all of them first (Megatron's forward-only schedule) and its last
    stage keeps, per micro-batch, the hidden states at the loss positions only (``M x
    H_teacher`` values, never ``[T, V]`` logits; fused loss only)."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, fused: bool,
                 device: torch.device, offload: bool):
        super().__init__()
        self.model, self.vocab_size, self.fused = model, vocab_size, fused
        self.offloader = Offloader(model, device, offload)

    def score(self, batch: StepBatch) -> TeacherScores | None:
        return None

    def outputs(self, inputs: list[StageInput], keeps: list[Tensor]) -> Callable[[int], object]:
        from megatron.core import parallel_state as ps

        if ps.get_pipeline_model_parallel_world_size() == 1:
            return lambda index: self._whole_model(inputs[index], keeps[index])
        if not self.fused:
            raise ValueError("the Megatron teacher at PP > 1 serves the fused loss only")
        return self._pipelined(inputs, keeps).__getitem__

    @torch.no_grad()
    def _whole_model(self, item: StageInput, keep: Tensor):
        with self.timed():
            outputs = loss_inputs(self.model, item.tokens, item.positions, self.vocab_size,
                                  self.fused, item.packed)
            if not self.fused:
                return outputs
            hidden, weight = outputs
            return hidden.reshape(-1, hidden.shape[-1])[keep], weight

    @torch.no_grad()
    def _pipelined(self, inputs: list[StageInput], keeps: list[Tensor]) -> list:
        def at_loss_positions(index: int, output: Tensor, _prepared) -> tuple[Tensor, Tensor]:
            hidden = hidden_from_output(self.model, output)
            return (hidden.reshape(-1, hidden.shape[-1])[keeps[index]],
                    output_weight(self.model))

        with self.timed():
            return run_micro_batches(self.model, inputs, at_loss_positions, forward_only=True)

    def active(self) -> contextlib.AbstractContextManager:
        return self.offloader.on_device()


class CachedTeacher(_Stopwatch):
    """The teacher's top-k log-probs read from a ``dgrpo teacher-cache`` directory, keyed
    by example id, for prompt + reference answer sequences (KD)."""

    def __init__(self, cache_dir: str):
        super().__init__()
        self.cache = TeacherTopKCache(cache_dir)

    def score(self, batch: StepBatch) -> TeacherScores:
        with self.timed():
            mask = batch.sequences.loss_mask
            k = self.cache.k
            indices = torch.zeros(*mask.shape, k, dtype=torch.long, device=mask.device)
            logp = torch.zeros(*mask.shape, k, device=mask.device)
            for row, example in enumerate(batch.examples):
                cached_ids, cached_logp = self.cache.lookup(example.id)
                positions = torch.nonzero(mask[row]).flatten()
                if len(positions) != len(cached_ids):
                    raise ValueError(f"teacher cache has {len(cached_ids)} tokens for example "
                                     f"{example.id!r}, the batch {len(positions)}: built with "
                                     "another tokenizer or data?")
                indices[row, positions] = cached_ids.to(mask.device)
                logp[row, positions] = cached_logp.to(mask.device)
            return TeacherScores(indices, logp)

    def outputs(self, inputs: list[StageInput], keeps: list[Tensor]) -> None:
        return None

    def active(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


# ---------------------------------------------------------------------------- reference


class TokenScorer:
    """Log-probs of a batch's targets under ``model`` without grad: the frozen reference
    (the anchor of a reference KL term) or the student before its updates (PPO's pi_old)."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, cp_group,
                 chunk_tokens: int | None):
        self.model = model
        self.vocab_size, self.cp_group, self.chunk_tokens = vocab_size, cp_group, chunk_tokens

    def token_logp(self, sequences: SequenceBatch, plan: list[MicroBatch],
                   temperature: float = 1.0) -> Tensor:
        """``[B, T]`` float32 log-probs ``log_softmax(logits / temperature)`` of the targets
        at the loss positions (0 elsewhere), on every rank: the micro-batches (this CP
        rank's shards, or packs) through the pipeline schedule, chunked and
        vocabulary-parallel, gathered over CP."""
        parts = [micro_batch.sequences(sequences) for micro_batch in plan]
        logps = micro_batch_logp(self.model, [mb.stage_input(part) for mb, part in
                                              zip(plan, parts)],
                                 [part.targets for part in parts],
                                 [part.loss_mask for part in parts], self.vocab_size,
                                 self.chunk_tokens, temperature)
        out = torch.zeros(sequences.targets.shape, dtype=torch.float32,
                          device=sequences.targets.device)
        for micro_batch, logp in zip(plan, logps):
            micro_batch.place(out, logp, self.cp_group)
        return out
