"""Refit verification, cheap enough to run every N steps.

Three checks, all against the live trainer (never against what the refit believed it sent):

1. Log-probs of a probe batch: the engine scores the probe sequences teacher-forced
   (``prompt_logprobs``: a prefill) and the trainer runs its forward on the same tokens; the
   largest absolute gap (nats) must stay within ``logprob_tol``.
2. Log-probs of decoded tokens: the engine generates ``decode_tokens`` greedy tokens from
   each probe prompt (prefill, then decode steps through its KV cache) and reports their
   log-probs as it sampled them; the trainer scores the same tokens teacher-forced. Refit
   bugs have shown correct prefills with corrupt decoding (a stale KV prefix cache, CUDA
   graphs captured on the old weights), which the first check alone cannot see.
3. Weight fingerprints: for every Hugging Face tensor ``W`` [N, K], the vector ``W @ x_K``
   (``x_K`` a fixed pseudo-random probe of length K, float64); 1-D tensors are their own
   fingerprint. The trainer computes it from its *shards* without gathering (row shards
   give rows, column shards give partial sums that are all-reduced) and maps it to HF names
   with the conversion table; the engine computes it by running each of its linear layers
   on ``x_K`` (so it works whatever layout the backend packed the weights into, e.g. the
   CPU backend's repacked GEMM weights) and reading the other parameters directly.
   The relative error ``|f_engine - f_trainer| / |f_trainer|`` of each tensor names the
   worst parameter when something is off.

Engine tensor parallelism: each engine worker fingerprints its own shards and the pieces are
tiled by offset (:func:`~megatron_dgrpo.rollout.vllm_worker.merge_worker_fingerprints`); a
replicated tensor is compared once per worker.

Cost per call: one mat-vec per parameter on each side, a scoring pass and a short greedy
generation on the engine, one chunked forward over both probe sets on the trainer (only
the probed tokens reach the output layer: no ``[T, V]`` logits). Any failure raises
:class:`RefitVerificationError` on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_dgrpo.models import mapping
from megatron_dgrpo.models.config import ModelConfig
from megatron_dgrpo.models.mapping import TPSplit
from megatron_dgrpo.parallel.collectives import (
    all_gather_objects,
    all_gather_tensors,
    all_reduce,
    broadcast_object,
    gather_objects,
    world_rank,
)
from megatron_dgrpo.parallel.context import cp_all_gather, cp_shard, sequence_alignment
from megatron_dgrpo.parallel.replicas import Replica
from megatron_dgrpo.rollout.engine import SamplingParams
from megatron_dgrpo.rollout.sequences import build_sequences
from megatron_dgrpo.rollout.vllm_worker import (
    engine_fingerprints,
    merge_worker_fingerprints,
    probe_vector,
)

_DEFAULT_FINGERPRINT_RTOL = {"torch.float32": 1e-5, "torch.bfloat16": 2e-2, "torch.float16": 5e-3}


class RefitVerificationError(RuntimeError):
    """The engine's weights or log-probs disagree with the trainer's."""


@dataclass
class VerificationReport:
    """Result on the engine's rank: largest log-prob gaps (nats) of the teacher-forced probe
    and of the engine's decoded tokens, and per-tensor relative fingerprint errors."""

    max_logprob_gap: float
    relative_errors: dict[str, float]
    max_decode_logprob_gap: float = 0.0

    @property
    def worst_parameter(self) -> tuple[str, float]:
        name = max(self.relative_errors, key=self.relative_errors.get)
        return name, self.relative_errors[name]


# ---------------------------------------------------------------------------------------
# Trainer side


def _full_fingerprint(split: TPSplit, shard: torch.Tensor, config: ModelConfig,
                      tp_rank: int, tp: int, group) -> torch.Tensor:
    """Fingerprint of the full Megatron tensor from this rank's shard: [rows] or [rows, 1]."""
    shard = shard.detach().double().cpu()
    if shard.dim() == 1:
        return shard
    if split is TPSplit.ROW:
        columns = shard.shape[1]
        probe = probe_vector(columns * tp)[tp_rank * columns:(tp_rank + 1) * columns]
        return all_reduce(shard @ probe, "sum", group)[:, None]
    rows = all_gather_tensors((shard @ probe_vector(shard.shape[1]))[:, None], group)
    return mapping.merge_tp_shards(split, rows, config.vocab_size)


def trainer_fingerprints(model: torch.nn.Module, config: ModelConfig,
                         replica: Replica | None = None) -> dict[str, torch.Tensor]:
    """HF name -> fingerprint of the live model (every rank of ``replica`` calls, default
    the whole world as one replica; its leader gets all stages, the other ranks an empty
    dict)."""
    from megatron.core import parallel_state as ps

    from megatron_dgrpo.models.chunks import pipeline_stages
    from megatron_dgrpo.rollout.refit import live_parameters

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    group = ps.get_tensor_model_parallel_group()
    stages = pipeline_stages()
    local: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for stage, live in live_parameters(model, config).items():
            for param in mapping.stage_params(config, stage, stages):
                if not param.rule.exported:
                    continue
                full = _full_fingerprint(param.rule.split, live[param.local_name], config,
                                         tp_rank, tp, group)
                for name, piece in mapping.megatron_to_hf(param, full, config):
                    local[name] = piece.reshape(-1)
    leader, group = (replica.leader, replica.group) if replica else (0, None)
    gathered = gather_objects(local if tp_rank == 0 else {}, leader, group)
    if world_rank() != leader:
        return {}
    merged: dict[str, torch.Tensor] = {}
    for part in gathered:
        merged.update(part)
    return merged


def trainer_token_logprobs(model: torch.nn.Module, config: ModelConfig,
                           sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int],
                           temperature: float = 1.0,
                           chunk_tokens: int | None = None) -> list[list[float]]:
    """``log_softmax(logits / temperature)`` of each token at positions ``prompt_lengths[i]
    ..``, from the trainer's forward: only those positions reach the output layer, chunk by
    chunk and vocabulary-parallel (no ``[T, V]`` logits, no gather of the vocabulary). Any
    TP, CP and PP (all ranks call with the same inputs; under CP each runs its
    load-balanced shard and the per-token log-probs are gathered; at PP > 1 the stages run
    Megatron's schedule and the last one hands the log-probs to the others)."""
    from megatron.core import parallel_state as ps

    from megatron_dgrpo.models.forward import token_logp

    cp_group, cp_size = ps.get_context_parallel_group(), ps.get_context_parallel_world_size()
    align = sequence_alignment(cp_size, ps.get_tensor_model_parallel_world_size(),
                               getattr(model.config, "sequence_parallel", False))
    batch = build_sequences([s[:n] for s, n in zip(sequences, prompt_lengths)],
                            [s[n:] for s, n in zip(sequences, prompt_lengths)], align=align)
    if cp_size > 1:
        rank = ps.get_context_parallel_rank()
        batch = batch.map(lambda tensor: cp_shard(tensor, rank, cp_size))
    device = next(model.parameters()).device
    batch = batch.to(device)
    was_training = model.training
    model.eval()
    try:
        logp = token_logp(model, batch.tokens, batch.positions, batch.targets, batch.loss_mask,
                          config.vocab_size, chunk_tokens, temperature)
    finally:
        model.train(was_training)
    logp = cp_all_gather(logp, cp_group if cp_size > 1 else None).cpu()
    return [logp[i, n - 1:len(s) - 1].tolist() for i, (s, n) in
            enumerate(zip(sequences, prompt_lengths))]


def fingerprint_norms(prints: dict[str, torch.Tensor | Sequence[float]]) -> dict[str, float]:
    """HF name -> L2 norm of its fingerprint (float64): a compact record of which weights a
    model holds (trainer's :func:`trainer_fingerprints`, or the engine's
    :func:`engine_weight_digest`); the same weights give the same norms within the
    fingerprint tolerance, one optimizer step apart they differ far beyond it."""
    return {name: float(torch.as_tensor(values, dtype=torch.float64).norm())
            for name, values in prints.items()}


def engine_weight_digest(engine, config: ModelConfig) -> dict[str, float]:
    """:func:`fingerprint_norms` of the weights ``engine`` samples with, through its own
    layers (each tensor's first engine path; ``nan`` where the engine lacks it); call on
    the engine's rank while it is idle."""
    _, prints = merge_worker_fingerprints(
        engine.run_on_workers(engine_fingerprints, mapping.hf_shapes(config)))
    digest = fingerprint_norms({name: paths[0] for name, paths in prints.items() if paths})
    return {name: digest.get(name, math.nan) for name in prints}


# ---------------------------------------------------------------------------------------
# The check


def _relative_error(engine_paths: list[list[float]], trainer: torch.Tensor) -> float:
    """Worst relative error over the engine's paths; inf if missing or mis-shaped."""
    engine = [torch.tensor(path, dtype=torch.float64) for path in engine_paths]
    if not engine or any(e.shape != trainer.shape for e in engine):
        return math.inf
    errors = [float((e - trainer).norm() / trainer.norm().clamp_min(1e-30)) for e in engine]
    return math.inf if any(math.isnan(e) for e in errors) else max(errors)


def _max_gap(engine: Sequence[Sequence[float]], trainer: Sequence[Sequence[float]]) -> float:
    """Largest ``|engine - trainer|`` over all tokens (inf if any is NaN; 0 if none)."""
    gaps = [abs(e - t) for es, ts in zip(engine, trainer, strict=True)
            for e, t in zip(es, ts, strict=True)]
    gap = max(gaps) if gaps else 0.0
    return math.inf if math.isnan(gap) else gap


def compare(engine_logprobs: Sequence[Sequence[float]], trainer_logprobs: Sequence[Sequence[float]],
            engine_prints: dict[str, list[list[float]]],
            trainer_prints: dict[str, torch.Tensor],
            engine_decoded: Sequence[Sequence[float]] = (),
            trainer_decoded: Sequence[Sequence[float]] = ()) -> VerificationReport:
    """Largest log-prob gaps (teacher-forced probe; decoded tokens) and per-tensor relative
    fingerprint errors."""
    errors = {name: _relative_error(engine_prints.get(name, []), value)
              for name, value in trainer_prints.items()}
    return VerificationReport(_max_gap(engine_logprobs, trainer_logprobs), errors,
                              _max_gap(engine_decoded, trainer_decoded))


def failure_message(report: VerificationReport, logprob_tol: float,
                    fingerprint_rtol: float) -> str | None:
    """None if the report is within tolerance, else a message naming the worst parameter."""
    name, worst = report.worst_parameter
    over = sorted((n for n, e in report.relative_errors.items() if e > fingerprint_rtol),
                  key=lambda n: -report.relative_errors[n])
    gaps = (report.max_logprob_gap, report.max_decode_logprob_gap)
    if max(gaps) <= logprob_tol and not over:
        return None
    lines = [(f"refit verification failed: max |log-prob gap| {gaps[0]:.3e} nats on the "
              f"teacher-forced probe, {gaps[1]:.3e} nats on the engine's decoded tokens "
              f"(tolerance {logprob_tol:.1e})")]
    if gaps[1] > logprob_tol >= gaps[0]:
        lines.append("the engine scores the probe right but decodes wrong (its KV cache or "
                     "decode kernels hold stale state)")
    if over:
        lines.append(f"worst parameter: {name} (relative fingerprint error {worst:.3e}, "
                     f"tolerance {fingerprint_rtol:.1e}; inf = missing in the engine)")
        lines.append(f"{len(over)} parameter(s) over tolerance: {', '.join(over[:6])}"
                     + (" ..." if len(over) > 6 else ""))
    else:
        lines.append(f"all weight fingerprints match (worst: {name}, {worst:.3e}); the "
                     f"difference is in the forward pass, not in the weights")
    return "; ".join(lines)


def _decode_probe(engine, prompts: list[list[int]], decode_tokens: int,
                  replica: Replica | None) -> tuple[list[list[int]], list[list[float]]]:
    """The engine's greedy ``decode_tokens`` tokens per prompt and their log-probs (on the
    replica's leader; the tokens also on its other ranks, the log-probs only there)."""
    leader, group = (replica.leader, replica.group) if replica else (0, None)
    decoded = None
    if world_rank() == leader and decode_tokens > 0:
        batch = engine.generate(prompts, SamplingParams(temperature=0.0,
                                                        max_new_tokens=decode_tokens))
        decoded = [(r.response_ids, r.logprobs) for r in batch.rollouts]
    decoded = broadcast_object(decoded, src=leader, group=group) or []
    return [ids for ids, _ in decoded], [logprobs for _, logprobs in decoded]


def verify_refit(engine, model: torch.nn.Module, config: ModelConfig,
                 probe_sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int],
                 logprob_tol: float = 1e-4, fingerprint_rtol: float | None = None,
                 replica: Replica | None = None,
                 decode_tokens: int = 4) -> VerificationReport | None:
    """Check each replica's engine against the replica's model; raise
    :class:`RefitVerificationError` on every rank if any check of any replica fails. Call on
    every trainer rank with this rank's ``replica``
    (default: the world is one replica, led by rank 0) and its probes; ``engine`` is the
    engine on the replica's leader and None elsewhere. Returns the report on the leaders.

    ``decode_tokens``: greedy tokens the engine generates from each probe prompt (the first
    ``prompt_lengths[i]`` tokens of each probe), whose decode-time log-probs are compared
    with the trainer's (0: no decode probe); each prompt plus them must fit the engine's
    ``max_model_len``. ``fingerprint_rtol`` defaults by the engine's dtype (1e-5 for
    float32, 2e-2 bfloat16).
    """
    prompts = [list(s[:n]) for s, n in zip(probe_sequences, prompt_lengths, strict=True)]
    decoded, engine_decoded = _decode_probe(engine, prompts, decode_tokens, replica)
    scored = trainer_token_logprobs(
        model, config, [*probe_sequences, *(p + d for p, d in zip(prompts, decoded))],
        [*prompt_lengths, *(len(p) for p in prompts[:len(decoded)])])
    trainer_logprobs, trainer_decoded = scored[:len(prompts)], scored[len(prompts):]
    trainer_prints = trainer_fingerprints(model, config, replica)
    message, report = None, None
    if world_rank() == (replica.leader if replica else 0):
        engine_logprobs = engine.score(probe_sequences, prompt_lengths)
        all_shapes = mapping.hf_shapes(config)
        shapes = {name: all_shapes[name] for name in trainer_prints}
        dtype, engine_prints = merge_worker_fingerprints(
            engine.run_on_workers(engine_fingerprints, shapes))
        rtol = fingerprint_rtol if fingerprint_rtol is not None else \
            _DEFAULT_FINGERPRINT_RTOL.get(dtype, 2e-2)
        report = compare(engine_logprobs, trainer_logprobs, engine_prints, trainer_prints,
                         engine_decoded, trainer_decoded)
        message = failure_message(report, logprob_tol, rtol)
    messages = all_gather_objects(message)  # every replica's verdict, on every rank
    failures = [m for m in messages if m]
    if failures:
        raise RefitVerificationError(failures[0])
    return report

