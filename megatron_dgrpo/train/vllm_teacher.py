"""The teacher as a vLLM engine returning top-k log-probs (``teacher.engine: vllm``).

One engine per data-parallel replica starts once, on the replica's leader (its first rank,
:mod:`megatron_dgrpo.parallel.replicas`), from the teacher's Megatron weights exported to
Hugging Face (the same path as the rollout engines,
:func:`megatron_dgrpo.train.vllm_rollouts.start_engine_from_model`); the teacher never
changes, so there is no refit. Per step, :meth:`VLLMTeacher.score` turns a
:class:`~megatron_dgrpo.train.sequences.SequenceBatch` into what the loss reads at the loss
positions: the teacher's top-k ``(ids, log-probs)`` for ``loss.kl_estimator: topk`` and its
log-prob of each target for the sampled estimators (k1/k2/k3), the advantage form and the
``kl_teacher`` metric. No teacher logits exist, so ``kl_estimator: full`` is refused at
start-up (:meth:`megatron_dgrpo.train.config.RunConfig.validate`).

Several ranks: every rank of a replica holds the same batch (TP and CP peers), so the
leader scores it in one engine call and broadcasts the results to the replica's ranks.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from megatron_dgrpo.models.forward import StageInput
from megatron_dgrpo.parallel.collectives import broadcast_object
from megatron_dgrpo.parallel.replicas import Replica
from megatron_dgrpo.rollout.sequences import SequenceBatch
from megatron_dgrpo.train.batch import StepBatch
from megatron_dgrpo.train.sources import TeacherScores, _Stopwatch


def scoring_requests(batch: SequenceBatch) -> list[tuple[list[int], int] | None]:
    """Per row: ``(sequence, prompt_length)`` covering the row's loss positions, or ``None``
    for a row without loss tokens. Loss position ``t`` predicts ``tokens[t + 1]``, i.e. the
    engine's position ``t + 1``; the loss positions of a row must be contiguous."""
    requests = []
    for mask, tokens in zip(batch.loss_mask.cpu(), batch.tokens.cpu()):
        positions = torch.nonzero(mask).flatten()
        if len(positions) == 0:
            requests.append(None)
            continue
        first, last = int(positions[0]), int(positions[-1])
        if len(positions) != last - first + 1:
            raise ValueError("the vLLM teacher scores one contiguous response per row; "
                             "this row's loss positions have gaps")
        requests.append((tokens[:last + 2].tolist(), first + 1))
    return requests


class VLLMTeacher(_Stopwatch):
    """Teacher scores from a vLLM engine, a :class:`~megatron_dgrpo.train.sources.
    TeacherSource`; call :meth:`score` on every rank.

    Args:
        engine: the :class:`~megatron_dgrpo.rollout.vllm_engine.VLLMEngine` on the replica's
            leader (``None`` on its other ranks), e.g. from :meth:`start`.
        k: top-k tokens per position.
        replica: this rank's :class:`~megatron_dgrpo.parallel.replicas.Replica`; ``None``:
            a single process holding ``engine``.
    """

    def __init__(self, engine, k: int, replica: Replica | None = None):
        super().__init__()
        self.engine, self.k, self.replica = engine, k, replica

    @classmethod
    def start(cls, teacher: torch.nn.Module, model_config, k: int, rollout_config,
              max_model_len: int, seed: int, replica: Replica) -> VLLMTeacher:
        """Export the (Megatron) ``teacher`` and start the replica's engine on its leader with
        the engine settings of the run's ``rollout`` section (dtype, KV cache, GPU memory
        share, engine tensor parallelism). Call on every rank of ``replica``."""
        from megatron_dgrpo.train.vllm_rollouts import engine_options, start_engine_from_model

        engine = start_engine_from_model(
            teacher, model_config, replica, rollout_config.refit_bucket_mb,
            max_model_len=max_model_len, seed=seed, max_logprobs=k,
            **engine_options(rollout_config))
        return cls(engine, k, replica)

    def score(self, batch: StepBatch) -> TeacherScores:
        """The teacher at ``batch``'s loss positions, on the batch's device (0 elsewhere):
        ``topk_indices`` int64 ``[B, T, k]``, ``topk_logp`` float32 ``[B, T, k]`` (best
        first) and ``logp`` float32 ``[B, T]`` of the targets; natural-log probabilities of
        the teacher's full-vocabulary ``log_softmax`` (T = 1)."""
        with self.timed():
            return self.score_sequences(batch.sequences)

    def score_sequences(self, sequences: SequenceBatch) -> TeacherScores:
        """:meth:`score` of bare ``sequences``."""
        requests = scoring_requests(sequences)
        mine = self._scores(requests)
        shape, device = sequences.loss_mask.shape, sequences.loss_mask.device
        indices = torch.zeros(*shape, self.k, dtype=torch.long)
        topk_logp = torch.zeros(*shape, self.k, dtype=torch.float32)
        logp = torch.zeros(shape, dtype=torch.float32)
        for row, (request, scores) in enumerate(zip(requests, mine)):
            if request is None:
                continue
            start = request[1] - 1
            stop = start + len(scores.logp)
            indices[row, start:stop], topk_logp[row, start:stop] = scores.topk_ids, scores.topk_logp
            logp[row, start:stop] = scores.logp
        return TeacherScores(indices.to(device), topk_logp.to(device), logp.to(device))

    def outputs(self, inputs: list[StageInput], keeps: list[Tensor]) -> None:
        return None  # no teacher logits: everything comes from score()

    def active(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def _scores(self, requests):
        """The replica's scores, one per request (``None`` for ``None``), from its leader."""
        replica = self.replica
        results = [None]
        if replica is None or replica.is_leader:
            chosen = [i for i, r in enumerate(requests) if r is not None]
            scored = self.engine.score_topk([requests[i][0] for i in chosen],
                                            [requests[i][1] for i in chosen],
                                            self.k) if chosen else []
            results[0] = [None] * len(requests)
            for i, scores in zip(chosen, scored):
                results[0][i] = scores
        if replica is None:
            return results[0]
        return broadcast_object(results[0], src=replica.leader, group=replica.group)
