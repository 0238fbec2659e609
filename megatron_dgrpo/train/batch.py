"""What a training step knows, as typed records: the step's batch and its micro-batches.

:class:`StepBatch` is the arrow between a sequence source (rollouts, or fixed prompt +
answer sequences, :mod:`megatron_dgrpo.train.sources`) and everything after it in the step
(rewards, teacher signals, the loss). Its rows are sequences; rows ``[g * G, (g + 1) * G)``
share one prompt (``G = group_size``). :func:`answer_sequences` is the one builder of
"prompt + reference answer" sequences, shared by the SFT/KD trainer and the teacher top-k
cache (their token positions must agree exactly for cache look-ups to work).

A micro-batch is rows ``[start, stop)`` cut to ``width`` columns: one past the last loss
position of its rows, rounded up to the layout's alignment (``align``; ``T`` is a multiple
of it too). Under causal attention the dropped columns (padding, or the final token, which
predicts nothing) cannot change the earlier positions, so per-token results of a
micro-batch equal those of the full batch at the same positions. Loss weights stay the ones
computed for the whole global batch, so the micro-batch losses add up to the step's loss
exactly. With context parallelism (``cp_size > 1``) a micro-batch hands out only this CP
rank's load-balanced ``[rows, width / cp_size]`` shard of every per-token tensor
(:func:`megatron_dgrpo.parallel.context.cp_shard`); ``width`` is then a multiple of
``2 * cp_size``. With ``pack_sequences`` the micro-batches are packs of rows instead
(:class:`~megatron_dgrpo.train.packing.PackedMicroBatch`, same interface).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor

from megatron_dgrpo.algorithms.inputs import TokenBatch
from megatron_dgrpo.data.longblocks import LongBlocksExample
from megatron_dgrpo.models.forward import StageInput
from megatron_dgrpo.parallel.context import cp_all_gather, cp_shard
from megatron_dgrpo.rollout.sequences import SequenceBatch, build_sequences


@dataclass
class StepBatch:
    """One data-parallel rank's share of a step.

    Attributes:
        examples: the example each row answers (``B`` entries; a prompt's ``G`` rows share it).
        sequences: the rows as ``[B, T]`` tensors (prompt + response, right-padded).
        group_size: rows per prompt (``sampling.n`` on-policy, 1 for fixed sequences).
        responses: each row's response text (end-of-turn marker and what follows cut off).
        response_lengths: generated tokens per row.
        truncated: whether each row stopped at ``max_new_tokens`` (no stop token).
        rollout_logp: ``[B, T]`` float32 engine log-probs of the sampled tokens at the loss
            positions (0 elsewhere); ``None`` for fixed sequences.
        generation_seconds: wall time of the rollouts (0 for fixed sequences).
        rewards: ``[B]`` float32 outcome rewards, set by the step when the objective uses them.
    """

    examples: list[LongBlocksExample]
    sequences: SequenceBatch
    group_size: int = 1
    responses: list[str] = field(default_factory=list)
    response_lengths: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    rollout_logp: Tensor | None = None
    generation_seconds: float = 0.0
    rewards: Tensor | None = None

    @property
    def num_groups(self) -> int:
        return len(self.examples) // self.group_size

    def group_rewards(self) -> Tensor:
        """``[num_groups, group_size]`` rewards (set them first)."""
        return self.rewards.reshape(-1, self.group_size)

    def select_groups(self, groups: Sequence[int]) -> StepBatch:
        """The batch of prompt groups ``groups`` (indices, in that order)."""
        rows = [g * self.group_size + i for g in groups for i in range(self.group_size)]
        index = torch.tensor(rows, dtype=torch.long, device=self.sequences.tokens.device)

        def pick(values: list) -> list:
            return [values[r] for r in rows] if values else values

        return StepBatch(
            examples=pick(self.examples), sequences=self.sequences.map(lambda t: t[index]),
            group_size=self.group_size, responses=pick(self.responses),
            response_lengths=pick(self.response_lengths), truncated=pick(self.truncated),
            rollout_logp=None if self.rollout_logp is None else self.rollout_logp[index],
            generation_seconds=self.generation_seconds,
            rewards=None if self.rewards is None else self.rewards[index])

    @staticmethod
    def concatenate(batches: Sequence[StepBatch]) -> StepBatch:
        """One batch of the rows of ``batches`` (same group size; right-padded to the widest,
        whose width is already aligned); generation times add up."""
        if len(batches) == 1:
            return batches[0]
        width = max(b.sequences.tokens.shape[1] for b in batches)

        def cat(tensors: list[Tensor]) -> Tensor:
            return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tensors])

        sequences = SequenceBatch(*(cat([getattr(b.sequences, f.name) for b in batches])
                                    for f in fields(SequenceBatch)))
        # positions beyond each row's length are padding: keep them increasing as built
        sequences.positions = torch.arange(width, device=sequences.positions.device).expand(
            sequences.positions.shape[0], -1).contiguous()
        logps = [b.rollout_logp for b in batches]
        return StepBatch(
            examples=[e for b in batches for e in b.examples], sequences=sequences,
            group_size=batches[0].group_size, responses=[r for b in batches for r in b.responses],
            response_lengths=[n for b in batches for n in b.response_lengths],
            truncated=[t for b in batches for t in b.truncated],
            rollout_logp=None if logps[0] is None else cat(logps),
            generation_seconds=sum(b.generation_seconds for b in batches),
            rewards=None if batches[0].rewards is None else torch.cat([b.rewards for b in batches]))

    @property
    def references(self) -> list[str]:
        """Each row's reference answer."""
        return [example.reference_answer for example in self.examples]

    @property
    def tasks(self) -> list[str | None]:
        """Each row's task name (synthetic tasks; ``None`` for public rows)."""
        return [example.metadata.get("task") for example in self.examples]


def answer_ids(tokenizer, example: LongBlocksExample) -> list[int]:
    """Token ids of the assistant turn answering ``example`` with its training target
    (``data.target``: the reference answer or a teacher's response; reply plus end-of-turn
    marker), as they follow the prompt in a full conversation."""
    target = example.reference_answer if example.target_answer is None else example.target_answer
    return tokenizer.response_ids(example.user_message, target)


def answer_sequences(examples: Sequence[LongBlocksExample], tokenizer, align: int = 1,
                     prompt_loss: bool = False) -> SequenceBatch:
    """``prompt + target answer`` of each example (:func:`answer_ids`) as a
    :class:`SequenceBatch` (width a multiple of ``align``), the loss on the answer tokens, or
    with ``prompt_loss`` on every token after the first (language modelling on the prompt
    too, "train on inputs")."""
    answers = [answer_ids(tokenizer, e) for e in examples]
    sequences = build_sequences([e.prompt_ids for e in examples], answers, align=align)
    if prompt_loss:
        ends = torch.tensor([len(e.prompt_ids) + len(a) for e, a in zip(examples, answers)])
        positions = torch.arange(sequences.loss_mask.shape[1])
        sequences.loss_mask = positions[None, :] < ends[:, None] - 1
    return sequences


# ---------------------------------------------------------------------------- micro-batches


@dataclass(frozen=True)
class MicroBatch:
    """Rows ``[start, stop)`` of the step's batch, columns ``[0, width)``; with
    ``cp_size > 1``, CP rank ``cp_rank``'s shard of those columns."""

    start: int
    stop: int
    width: int
    cp_rank: int = 0
    cp_size: int = 1

    def _part(self, tensor: Tensor) -> Tensor:
        part = tensor[self.start:self.stop, :self.width]
        return part if self.cp_size == 1 else cp_shard(part, self.cp_rank, self.cp_size)

    def sequences(self, batch: SequenceBatch) -> SequenceBatch:
        """The micro-batch's ``[stop - start, width / cp_size]`` part of ``batch``."""
        return batch.map(self._part)

    def tokens(self, batch: TokenBatch) -> TokenBatch:
        """The micro-batch's part of every per-token tensor (top-k ones keep their ``K``)."""
        return replace(batch, **{f.name: None if getattr(batch, f.name) is None
                                 else self._part(getattr(batch, f.name))
                                 for f in fields(batch)})

    def stage_input(self, part: SequenceBatch) -> StageInput:
        """The model inputs of ``part`` (this micro-batch's :meth:`sequences`)."""
        return StageInput(part.tokens, part.positions)

    def place(self, out: Tensor, values: Tensor, cp_group=None) -> None:
        """Write per-token ``values`` of this micro-batch (this CP rank's shard; gathered
        over ``cp_group``) into the step batch's ``[B, T]`` tensor ``out``."""
        out[self.start:self.stop, :self.width] = cp_all_gather(values, cp_group)

    @property
    def rows(self) -> range:
        """The step batch's rows in this micro-batch."""
        return range(self.start, self.stop)

    @property
    def computed_tokens(self) -> int:
        """Token positions the forward runs over (all CP ranks together), padding included."""
        return (self.stop - self.start) * self.width


def used_lengths(loss_mask: Tensor) -> list[int]:
    """Per row of a ``[B, T]`` loss mask: one past its last loss position (0 without loss
    tokens). Later columns (padding, the final token) cannot change the loss under causal
    attention, so a row's forward needs only these."""
    columns = torch.arange(1, loss_mask.shape[1] + 1, device=loss_mask.device)
    return (loss_mask * columns).amax(dim=1).tolist()


def plan_micro_batches(loss_mask: Tensor, size: int | None, align: int = 1,
                       cp_rank: int = 0, cp_size: int = 1) -> list[MicroBatch]:
    """Consecutive groups of ``size`` rows (``None``: one group of all rows) of a
    ``[B, T]`` loss mask, each with its trimmed width (>= 1) rounded up to a multiple of
    ``align`` (``T`` must be one; with ``cp_size > 1``, ``align`` a multiple of
    ``2 * cp_size``)."""
    rows, length = loss_mask.shape
    if length % align or (cp_size > 1 and align % (2 * cp_size)):
        raise ValueError(f"batch width {length} and alignment {align} do not fit context "
                         f"parallelism over {cp_size} ranks (need width % align == 0 and "
                         f"align % {2 * cp_size} == 0)")
    size = size or rows
    plan = []
    for start in range(0, rows, size):
        stop = min(start + size, rows)
        used = torch.nonzero(loss_mask[start:stop].any(dim=0))
        width = int(used[-1]) + 1 if len(used) else 1
        plan.append(MicroBatch(start, stop, -(-width // align) * align, cp_rank, cp_size))
    return plan
