"""The teacher as a vLLM engine returning top-k log-probs (``teacher.engine: vllm``).

The engine starts once, on global rank 0, from the teacher's Megatron weights exported to
Hugging Face (the same path as the rollout engine,
:func:`megatron_dgrpo.train.vllm_rollouts.start_engine_from_model`); the teacher never
changes, so there is no refit. Per step, :meth:`VLLMTeacher.score` turns a
:class:`~megatron_dgrpo.train.sequences.SequenceBatch` into what the loss reads at the loss
positions: the teacher's top-k ``(ids, log-probs)`` for ``loss.kl_estimator: topk`` and its
log-prob of each target for the sampled estimators (k1/k2/k3), the advantage form and the
``kl_teacher`` metric. No teacher logits exist, so ``kl_estimator: full`` is refused at
start-up (:meth:`megatron_dgrpo.train.config.RunConfig.validate`).

Several ranks: each data-parallel replica's TP rank 0 sends its sequences to rank 0, which
scores them all in one engine call and broadcasts the results; every rank keeps its
replica's (TP peers hold the same batch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_dgrpo.train.sequences import SequenceBatch


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


class VLLMTeacher:
    """Teacher scores from a vLLM engine; call :meth:`score` on every rank.

    Args:
        engine: the :class:`~megatron_dgrpo.rollout.vllm_engine.VLLMEngine` on global rank 0
            (``None`` on the other ranks), e.g. from :meth:`start`.
        k: top-k tokens per position.
        dp_rank, tp_rank: this rank's data- and tensor-parallel ranks.
    """

    def __init__(self, engine, k: int, dp_rank: int = 0, tp_rank: int = 0):
        self.engine, self.k, self.dp_rank, self.tp_rank = engine, k, dp_rank, tp_rank

    @classmethod
    def start(cls, teacher: torch.nn.Module, model_config, k: int, rollout_config,
              max_model_len: int, seed: int, replica, tp_rank: int) -> VLLMTeacher:
        """Export the (Megatron) ``teacher`` from replica 0 and start its engine on rank 0
        with the engine settings of the run's ``rollout`` section (dtype, KV cache, GPU
        memory share). ``replica``: this rank's :class:`~megatron_dgrpo.parallel.replicas.
        Replica`."""
        from megatron_dgrpo.train.vllm_rollouts import start_engine_from_model

        engine = None
        if replica.index == 0:
            engine = start_engine_from_model(
                teacher, model_config, replica, rollout_config.refit_bucket_mb,
                dtype=rollout_config.dtype, max_model_len=max_model_len,
                kv_cache_gib=rollout_config.kv_cache_gib,
                gpu_memory_utilization=rollout_config.gpu_memory_utilization, seed=seed,
                max_logprobs=k)
        return cls(engine, k, replica.index, tp_rank)

    def score(self, batch: SequenceBatch) -> tuple[Tensor, Tensor, Tensor]:
        """The teacher at ``batch``'s loss positions, on the batch's device (0 elsewhere):
        ``topk_indices`` int64 ``[B, T, k]``, ``topk_logp`` float32 ``[B, T, k]`` (best
        first) and ``logp`` float32 ``[B, T]`` of the targets; natural-log probabilities of
        the teacher's full-vocabulary ``log_softmax`` (T = 1)."""
        requests = scoring_requests(batch)
        mine = self._scores(requests)
        shape, device = batch.loss_mask.shape, batch.loss_mask.device
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
        return indices.to(device), topk_logp.to(device), logp.to(device)

    def _scores(self, requests):
        """This replica's scores, one per request (``None`` for ``None``), from rank 0."""
        single = not dist.is_initialized() or dist.get_world_size() == 1
        if single:
            gathered = {0: requests}
        else:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (self.dp_rank, requests if self.tp_rank == 0 else None))
            gathered = {dp: part for dp, part in parts if part is not None}
        results = [None]
        if single or dist.get_rank() == 0:
            flat = [(dp, i, r) for dp, part in gathered.items() for i, r in enumerate(part)
                    if r is not None]
            scored = self.engine.score_topk([r[0] for _, _, r in flat], [r[1] for _, _, r in flat],
                                            self.k) if flat else []
            by_replica = {dp: [None] * len(part) for dp, part in gathered.items()}
            for (dp, i, _), scores in zip(flat, scored):
                by_replica[dp][i] = scores
            results[0] = by_replica
        if not single:
            dist.broadcast_object_list(results, src=0)
        replica = 0 if single else self.dp_rank
        return results[0][replica]
