"""Rollouts from a colocated vLLM engine, kept on the trainer's weights by refit + verification.

One engine (:class:`megatron_dgrpo.rollout.vllm_engine.VLLMEngine`, over
``rollout.engine_tensor_parallel`` GPUs) per model replica (data-parallel rank), on the
replica's leader (its first global rank, see :mod:`megatron_dgrpo.parallel.replicas`), so
rollout capacity grows with data parallelism.
Per step:

1. :meth:`VLLMRollouts.generate`: each leader samples its replica's prompts and broadcasts
   the rollouts to the replica's other ranks; they become the step's
   :class:`~megatron_dgrpo.train.batch.StepBatch`. The engines start at the first call, from the
   student's weights at that moment (after any resume), exported to a temporary Hugging
   Face directory. On GPU they then sleep (``sleep_level``) while the trainer works.
2. :meth:`VLLMRollouts.after_step` after the optimizer step: wake the engines, stream each
   replica's weights into its engine (:func:`megatron_dgrpo.rollout.refit.refit`), and every
   ``verify_every`` steps compare each engine with its replica (log-probs of probe
   sequences taken from the replica's rollouts, weight fingerprints;
   :func:`megatron_dgrpo.rollout.verify.verify_refit`). A mismatch in any replica raises
   :class:`RefitVerificationError` on every rank, which stops training.

Metrics (identical on every rank; the worst replica's): ``time/engine_start_s`` (first
step), ``time/refit_s``, ``refit/gb`` (per engine), ``verify/max_logprob_gap`` (nats,
teacher-forced probe), ``verify/max_decode_logprob_gap`` (nats, the engine's greedy decoded
tokens), ``verify/worst_fingerprint_error`` (relative), ``verify/passed``.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from megatron_dgrpo.data.longblocks import LongBlocksExample
from megatron_dgrpo.models.config import ModelConfig
from megatron_dgrpo.parallel.collectives import (
    barrier,
    broadcast_object,
    max_over_world,
    worst_over_world,
)
from megatron_dgrpo.parallel.replicas import Replica
from megatron_dgrpo.rollout.engine import RolloutBatch, SamplingConfig
from megatron_dgrpo.rollout.verify import RefitVerificationError
from megatron_dgrpo.train.batch import StepBatch
from megatron_dgrpo.train.sources import (
    RolloutError,
    Stateless,
    engine_rollouts,
    rollout_seed,
    rollout_step_batch,
)


class VLLMRollouts(Stateless):
    """The trainer's handle on its replica's engine, a :class:`~megatron_dgrpo.train.
    sources.SequenceSource`; call every method on every rank.

    Args:
        config: the run's ``rollout`` section (:class:`megatron_dgrpo.train.config.RolloutConfig`).
        model: the student (this rank's shard; the engine starts from and follows it).
        model_config: the student's architecture (HF export and refit mapping).
        sampling: the run's ``sampling`` section.
        max_model_len: longest prompt + response the engine must hold (tokens).
        seed: the run seed (engine seed + replica index; rollout seeds per step).
        replica: this rank's model replica (:func:`megatron_dgrpo.parallel.replicas.
            model_replica`).
        decode: token ids -> text, for rollouts the engine did not detokenize.
        align: sequence-width alignment of the step batch; device: where it goes.
    """

    def __init__(self, config, model: torch.nn.Module, model_config: ModelConfig,
                 sampling: SamplingConfig, max_model_len: int, seed: int, replica: Replica,
                 decode, align: int, device: torch.device):
        self.config, self.model, self.model_config = config, model, model_config
        self.sampling, self.max_model_len, self.seed = sampling, max_model_len, seed
        self.replica, self.decode, self.align, self.device = replica, decode, align, device
        self.engine = None  # the replica's VLLMEngine on its leader, once started
        self.started = False
        self._probe: list[tuple[list[int], int]] = []  # (sequence, prompt length) of this step

    # ------------------------------------------------------------------ start-up

    def _start(self) -> float:
        """Start the replica's engine from the student's current weights; returns seconds.
        Asynchronous rollouts (``rollout.async_mode``) need it in a process of its own, so
        that it samples while this process trains."""
        started = time.perf_counter()
        self.engine = start_engine_from_model(
            self.model, self.model_config, self.replica, self.config.refit_bucket_mb,
            max_model_len=self.max_model_len, seed=self.seed + self.replica.index,
            in_process=None if self.config.async_mode == "sync" else False,
            **engine_options(self.config))
        self.started = True
        return time.perf_counter() - started

    def serving_engine(self):
        """The replica's engine on the trainer's current weights (after a step's refit, or
        started here from them if no step has run yet), ``None`` off the replica's leader; and
        ``time/engine_start_s`` if it started now. Call on every rank."""
        metrics = {}
        if not self.started:
            metrics["time/engine_start_s"] = max_over_world(self._start())
        return self.engine, metrics

    # ------------------------------------------------------------------ per step

    def generate(self, examples: list[LongBlocksExample], step: int,
                 draw: int = 0) -> tuple[StepBatch, dict[str, float]]:
        """Rollouts of this replica's ``examples`` (the same on all its ranks), grouped by
        prompt; and the start-up metric on the first call."""
        _, metrics = self.serving_engine()
        rollouts = None
        if self.replica.is_leader:
            try:  # the replica's other ranks learn of a failure through the broadcast
                rollouts = self.sample(examples, step, draw)
            except RolloutError as exc:
                rollouts = exc
            if self.config.sleep_level and not isinstance(rollouts, RolloutError):
                self.engine.sleep(self.config.sleep_level)
        rollouts = broadcast_object(rollouts, src=self.replica.leader, group=self.replica.group)
        if isinstance(rollouts, RolloutError):
            raise RolloutError(f"replica {self.replica.index}: {rollouts}")
        return self.step_batch(examples, rollouts), metrics

    def sample(self, examples: list[LongBlocksExample], step: int, draw: int) -> RolloutBatch:
        """The engine's rollouts of ``examples`` at ``step`` / ``draw`` (replica leader only;
        no collectives, so it may run in a thread of its own); :class:`RolloutError` when
        the engine fails."""
        # seeded per prompt of the global batch: the same samples at any data-parallel size
        params = self.sampling.params(rollout_seed(self.seed, step, 0, draw),
                                      prompt_offset=self.replica.index * len(examples))
        return engine_rollouts(self.engine, [e.prompt_ids for e in examples], params, step)

    def step_batch(self, examples: list[LongBlocksExample],
                   rollouts: RolloutBatch) -> StepBatch:
        """The :class:`StepBatch` of ``rollouts`` of ``examples`` (every rank of the replica
        holds them); the first ones become the probe of the next verification."""
        count = self.config.verify_sequences
        self._probe = [(r.prompt_ids + r.response_ids, len(r.prompt_ids))
                       for r in rollouts.rollouts[:count]]
        return rollout_step_batch(examples, rollouts, self.sampling.n, self.decode, self.align,
                                  self.device)

    def after_step(self, step: int) -> dict[str, float]:
        """After an optimizer step: refit the engine, and verify it on ``verify_every`` steps."""
        from megatron_dgrpo.rollout.refit import refit
        from megatron_dgrpo.rollout.verify import verify_refit

        started = time.perf_counter()
        if self.replica.is_leader and self.config.sleep_level:
            self.engine.wake_up()
        report = refit(self.engine, self.model, self.model_config, self.config.refit_bucket_mb,
                       receiver=self.replica.leader)
        metrics = {"time/refit_s": time.perf_counter() - started}
        if report is not None:
            metrics["refit/gb"] = report.bytes / 1e9
        every = self.config.verify_every
        if every and step % every == 0:
            try:
                verified = verify_refit(self.engine, self.model, self.model_config,
                                        [s for s, _ in self._probe], [n for _, n in self._probe],
                                        logprob_tol=self.config.logprob_tolerance(
                                            self.model_config),
                                        replica=self.replica,
                                        decode_tokens=self.config.verify_decode_tokens)
            except RefitVerificationError as exc:
                raise RefitVerificationError(
                    f"step {step}: {exc}. Training stopped: the vLLM engine no longer samples "
                    "from the trainer's weights, so its rollouts would be off-policy in an "
                    "unaccounted way") from exc
            if verified is not None:
                metrics["verify/max_logprob_gap"] = verified.max_logprob_gap
                metrics["verify/max_decode_logprob_gap"] = verified.max_decode_logprob_gap
                metrics["verify/worst_fingerprint_error"] = verified.worst_parameter[1]
                metrics["verify/passed"] = 1.0
        return worst_over_world(metrics if self.replica.is_leader else {})


def engine_options(rollout_config) -> dict:
    """The :class:`~megatron_dgrpo.rollout.vllm_engine.VLLMEngine` settings of the run's
    ``rollout`` section (shared by the rollout engines and the vLLM teacher)."""
    return {"dtype": rollout_config.dtype, "kv_cache_gib": rollout_config.kv_cache_gib,
            "gpu_memory_utilization": rollout_config.gpu_memory_utilization,
            "tensor_parallel_size": rollout_config.engine_tensor_parallel,
            "max_num_seqs": rollout_config.max_num_seqs}


def export_hf(model: torch.nn.Module, model_config: ModelConfig, out_dir: Path,
              replica: Replica, bucket_mb: float) -> None:
    """The live Megatron ``model`` as a Hugging Face directory ``out_dir`` on the replica's
    leader (call on every rank of ``replica``: they take part in the TP gathers)."""
    from megatron_dgrpo.models.convert import write_hf_weights
    from megatron_dgrpo.rollout.refit import hf_weight_buckets

    buckets = hf_weight_buckets(model, model_config, bucket_mb, receiver=replica.leader)
    pairs = (pair for bucket in buckets for pair in bucket)
    if not replica.is_leader:
        for _ in pairs:  # take part in the collectives only
            pass
        return
    (out_dir / "config.json").write_text(json.dumps(model_config.to_hf_config()))
    write_hf_weights(out_dir, pairs)


def start_engine_from_model(model: torch.nn.Module, model_config: ModelConfig,
                            replica: Replica, bucket_mb: float, **engine_kwargs):
    """A :class:`~megatron_dgrpo.rollout.vllm_engine.VLLMEngine` on the leader of ``replica``
    (``None`` on its other ranks) started from ``model``'s current weights, exported to a
    temporary Hugging Face directory; ``engine_kwargs`` go to the engine. Call on every rank
    of ``replica``."""
    from megatron_dgrpo.rollout.vllm_engine import VLLMEngine

    engine = None
    with tempfile.TemporaryDirectory(prefix="dgrpo-vllm-") as tmp:  # used on the leader
        export_hf(model, model_config, Path(tmp), replica, bucket_mb)
        if replica.is_leader:
            engine = VLLMEngine(tmp, **engine_kwargs)
        barrier(replica.group)  # the engine has loaded the files before they go
    return engine
