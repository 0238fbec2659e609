"""Rollouts from a colocated vLLM engine, kept on the trainer's weights by refit + verification.

One engine (:class:`megatron_dgrpo.rollout.vllm_engine.VLLMEngine`, engine TP=1) lives on
global rank 0. Per step:

1. :meth:`VLLMRollouts.generate`: rank 0 samples the whole global batch and broadcasts it;
   each data-parallel rank keeps the rollouts of its own prompts. The engine starts at the
   first call, from the student's weights at that moment (after any resume), exported to a
   temporary Hugging Face directory. On GPU it then sleeps (``sleep_level``) while the
   trainer works.
2. :meth:`VLLMRollouts.sync` after the optimizer step: wake the engine, stream the new
   weights into it (:func:`megatron_dgrpo.rollout.refit.refit`), and every
   ``verify_every`` steps compare engine and trainer (log-probs of probe sequences taken
   from this step's rollouts, weight fingerprints; :func:`megatron_dgrpo.rollout.verify.
   verify_refit`). A mismatch raises :class:`RefitVerificationError` on every rank, which
   stops training.

Metrics (identical on every rank): ``time/engine_start_s`` (first step), ``time/refit_s``,
``refit/gb``, ``verify/max_logprob_gap`` (nats), ``verify/worst_fingerprint_error``
(relative), ``verify/passed``.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_dgrpo.models.config import ModelConfig
from megatron_dgrpo.rollout.engine import RolloutBatch, SamplingParams
from megatron_dgrpo.rollout.verify import RefitVerificationError


class VLLMRollouts:
    """The trainer's handle on the engine; call every method on every rank.

    Args:
        config: the run's ``rollout`` section (:class:`megatron_dgrpo.train.config.RolloutConfig`).
        model_config: the student's architecture (HF export and refit mapping).
        max_model_len: longest prompt + response the engine must hold (tokens).
        seed: engine seed.
        dp_rank: this rank's data-parallel rank (the refit runs on replica 0).
    """

    def __init__(self, config, model_config: ModelConfig, max_model_len: int, seed: int,
                 dp_rank: int):
        self.config = config
        self.model_config = model_config
        self.max_model_len = max_model_len
        self.seed = seed
        self.dp_rank = dp_rank
        self.engine = None  # the VLLMEngine on global rank 0, once started
        self.started = False
        self._probe: list[tuple[list[int], int]] = []  # (sequence, prompt length) of this step

    # ------------------------------------------------------------------ start-up

    def _start(self, model: torch.nn.Module) -> float:
        """Start the engine on rank 0 from ``model``'s current weights; returns seconds."""
        started = time.perf_counter()
        self.engine = start_engine_from_model(
            model, self.model_config, self.dp_rank, self.config.refit_bucket_mb,
            dtype=self.config.dtype, max_model_len=self.max_model_len,
            kv_cache_gib=self.config.kv_cache_gib,
            gpu_memory_utilization=self.config.gpu_memory_utilization, seed=self.seed)
        self.started = True
        return time.perf_counter() - started

    # ------------------------------------------------------------------ per step

    def generate(self, model: torch.nn.Module, prompts: list[list[int]], params: SamplingParams,
                 prompts_per_rank: int) -> tuple[RolloutBatch, dict[str, float]]:
        """This DP rank's rollouts of the global ``prompts`` (DP rank ``r`` owns prompts
        ``[r * prompts_per_rank, (r + 1) * prompts_per_rank)``), grouped by prompt with
        ``prompt_index`` relative to its own prompts; and the start-up metric if any."""
        metrics = {}
        if not self.started:
            metrics["time/engine_start_s"] = self._start(model)
        box = [None]
        if dist.get_rank() == 0:
            box[0] = self.engine.generate(prompts, params)
            if self.config.sleep_level:
                self.engine.sleep(self.config.sleep_level)
        dist.broadcast_object_list(box, src=0)
        batch: RolloutBatch = box[0]
        count = self.config.verify_sequences
        self._probe = [(r.prompt_ids + r.response_ids, len(r.prompt_ids))
                       for r in batch.rollouts[:count]]
        first = self.dp_rank * prompts_per_rank
        mine = [r for r in batch.rollouts if first <= r.prompt_index < first + prompts_per_rank]
        for rollout in mine:
            rollout.prompt_index -= first
        return RolloutBatch(rollouts=mine, seconds=batch.seconds), metrics

    def sync(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """After an optimizer step: refit the engine, and verify it on ``verify_every`` steps."""
        from megatron_dgrpo.rollout.refit import refit
        from megatron_dgrpo.rollout.verify import verify_refit

        started = time.perf_counter()
        if dist.get_rank() == 0 and self.config.sleep_level:
            self.engine.wake_up()
        report = None
        if self.dp_rank == 0:
            report = refit(self.engine, model, self.model_config, self.config.refit_bucket_mb)
        metrics = {"time/refit_s": time.perf_counter() - started}
        if report is not None:
            metrics["refit/gb"] = report.bytes / 1e9
        every = self.config.verify_every
        if every and step % every == 0:
            try:
                verified = verify_refit(self.engine, model, self.model_config,
                                        [s for s, _ in self._probe], [n for _, n in self._probe],
                                        logprob_tol=self.config.verify_logprob_tol)
            except RefitVerificationError as exc:
                raise RefitVerificationError(
                    f"step {step}: {exc}. Training stopped: the vLLM engine no longer samples "
                    "from the trainer's weights, so its rollouts would be off-policy in an "
                    "unaccounted way") from exc
            if verified is not None:
                metrics["verify/max_logprob_gap"] = verified.max_logprob_gap
                metrics["verify/worst_fingerprint_error"] = verified.worst_parameter[1]
                metrics["verify/passed"] = 1.0
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def export_hf(model: torch.nn.Module, model_config: ModelConfig, out_dir: Path, dp_rank: int,
              bucket_mb: float) -> None:
    """The live Megatron ``model`` as a Hugging Face directory ``out_dir`` on global rank 0
    (every rank of data-parallel replica 0 takes part in the TP gathers)."""
    from megatron_dgrpo.models.convert import write_hf_weights
    from megatron_dgrpo.rollout.refit import hf_weight_buckets

    if dp_rank != 0:
        return
    buckets = hf_weight_buckets(model, model_config, bucket_mb)
    pairs = (pair for bucket in buckets for pair in bucket)
    if dist.get_rank() != 0:
        for _ in pairs:  # take part in the collectives only
            pass
        return
    (out_dir / "config.json").write_text(json.dumps(model_config.to_hf_config()))
    write_hf_weights(out_dir, pairs)


def start_engine_from_model(model: torch.nn.Module, model_config: ModelConfig, dp_rank: int,
                            bucket_mb: float, **engine_kwargs):
    """A :class:`~megatron_dgrpo.rollout.vllm_engine.VLLMEngine` on global rank 0 (``None``
    on the other ranks) started from ``model``'s current weights, exported to a temporary
    Hugging Face directory; ``engine_kwargs`` go to the engine. Call on every rank."""
    from megatron_dgrpo.rollout.vllm_engine import VLLMEngine

    engine = None
    with tempfile.TemporaryDirectory(prefix="dgrpo-vllm-") as tmp:  # used on rank 0
        export_hf(model, model_config, Path(tmp), dp_rank, bucket_mb)
        if dist.get_rank() == 0:
            engine = VLLMEngine(tmp, **engine_kwargs)
        dist.barrier()  # the engine has loaded the files before the directory goes
    return engine
