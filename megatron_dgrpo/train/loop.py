"""The training loop of ``dgrpo train``: one step, readable top to bottom.

    prompts -> G rollouts per prompt (embedded engine, or vLLM) -> rewards -> group advantages
      -> scoring without grad (reference log-probs), per micro-batch; the old log-probs are
         the detached training log-probs (one optimizer step per rollout batch);
         teacher.engine=vllm: the teacher's top-k log-probs from its vLLM engine, whole batch
      -> per micro-batch: teacher forward, loss (config.loss_impl: fused from hidden states,
         or materialized logits), backward (gradients accumulate)
      -> Megatron optimizer step -> vLLM refit (+ verification every N steps)
      -> metrics, checkpoint

SFT and KD skip the rollouts and train on prompt + reference answer. Run on every rank
(``torchrun``); each data-parallel rank takes its own slice of the step's prompts, and the
loss is normalised over the whole global batch, so the update does not depend on the split.
With context parallelism the CP ranks of a replica hold the same (whole) step batch and
each runs the models on its load-balanced shard of every micro-batch
(:mod:`megatron_dgrpo.train.microbatch`); the CP ranks' loss pieces add up to the
micro-batch's loss.
"""

from __future__ import annotations

import resource
import time
from contextlib import nullcontext
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist

from megatron_dgrpo.algorithms.advantages import broadcast_to_tokens, group_advantages
from megatron_dgrpo.algorithms.aggregation import token_weights
from megatron_dgrpo.algorithms.inputs import TokenBatch
from megatron_dgrpo.algorithms.metrics import LossMetrics
from megatron_dgrpo.data.chat import IM_END, load_chat_tokenizer
from megatron_dgrpo.data.longblocks import LongBlocksExample, LongBlocksLoader
from megatron_dgrpo.parallel.context import (
    all_reduce_metrics,
    cp_all_gather,
    global_sequence_count,
    global_token_count,
    sequence_alignment,
)
from megatron_dgrpo.parallel.cpu import collective_device
from megatron_dgrpo.parallel.fused import PADDED_VOCAB_LOGIT, loss_from_hidden
from megatron_dgrpo.parallel.materialized import loss_from_logits
from megatron_dgrpo.parallel.replicas import model_replica
from megatron_dgrpo.parallel.vocab import vocab_parallel_terms
from megatron_dgrpo.rollout.engine import RolloutBatch, SamplingParams
from megatron_dgrpo.teacher_cache import TeacherTopKCache
from megatron_dgrpo.train.config import ON_POLICY_OBJECTIVES, RunConfig
from megatron_dgrpo.train.grad_norm import global_grad_norm
from megatron_dgrpo.train.hidden import final_hidden_states, output_weight
from megatron_dgrpo.train.microbatch import MicroBatch, plan_micro_batches
from megatron_dgrpo.train.offload import Offloader
from megatron_dgrpo.train.rollout_metrics import family_of, rollout_metrics
from megatron_dgrpo.train.sequences import SequenceBatch, build_sequences
from megatron_dgrpo.train.token_logp import chunked_token_logp
from megatron_dgrpo.train.vllm_rollouts import VLLMRollouts
from megatron_dgrpo.train.vllm_teacher import VLLMTeacher


class PromptStream:
    """Examples of the training data in a fixed order, epoch after epoch; resumable.

    ``position`` counts examples consumed in the current epoch. Resuming re-reads the epoch
    up to that position (the loader streams; nothing is held in memory).
    """

    def __init__(self, loader: LongBlocksLoader):
        self.loader = loader
        self.epoch, self.position = 0, 0
        self._iterator = iter(loader)

    def take(self, count: int) -> list[LongBlocksExample]:
        examples = []
        while len(examples) < count:
            example = next(self._iterator, None)
            if example is None:
                if self.position == 0:
                    raise ValueError("the training data has no usable rows "
                                     f"({self.loader.summary.format()})")
                self.epoch, self.position = self.epoch + 1, 0
                self._iterator = iter(self.loader)
                continue
            self.position += 1
            examples.append(example)
        return examples

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], 0
        self._iterator = iter(self.loader)
        for _ in range(state["position"]):
            next(self._iterator)
        self.position = state["position"]


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int, tp_rank: int) -> torch.Tensor:
    """Logits ``[..., V_local]`` of TP rank ``tp_rank`` with padding columns set to
    :data:`PADDED_VOCAB_LOGIT` (out of place, autograd-safe)."""
    local = logits.shape[-1]
    ids = torch.arange(tp_rank * local, (tp_rank + 1) * local, device=logits.device)
    if ids[-1] < vocab_size:
        return logits
    return logits.masked_fill(ids >= vocab_size, PADDED_VOCAB_LOGIT)


class Trainer:
    """Builds everything from a validated :class:`RunConfig` and runs steps; call on every rank."""

    def __init__(self, config: RunConfig):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        from megatron_dgrpo.models.provider import initialize_parallel
        from megatron_dgrpo.rollout.embedded import EmbeddedEngine

        self.config = config
        objective = config.loss.objective
        initialize_parallel(config.parallel, config.seed)
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.dp_group = ps.get_data_parallel_group()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.cp_group = ps.get_context_parallel_group()
        self.cp_rank, self.cp_size = (ps.get_context_parallel_rank(),
                                      ps.get_context_parallel_world_size())
        # Gradients and per-token sums span the data- and context-parallel ranks.
        self.dp_cp_group = ps.get_data_parallel_group(with_context_parallel=True)
        self.sequence_align = sequence_alignment(config.parallel.context_parallel,
                                                 config.parallel.tensor_parallel,
                                                 config.parallel.sequence_parallel)
        uses_vllm = config.uses_vllm_teacher() or (objective in ON_POLICY_OBJECTIVES
                                                   and config.rollout.engine == "vllm")
        self.replica = model_replica() if uses_vllm else None  # engines live on its leader

        self.tokenizer = load_chat_tokenizer(config.tokenizer)
        self.model_config = config.student.model_config()
        if self.tokenizer.vocab_size > self.model_config.vocab_size:
            raise ValueError(f"tokenizer {config.tokenizer} has {self.tokenizer.vocab_size} "
                             f"tokens, the student's vocabulary only {self.model_config.vocab_size}")
        self.student = self._build(self.model_config, config.student.init_from)
        self.device = next(self.student.parameters()).device
        self.reference = self._frozen_copy(self.student) if config.needs_reference() else None
        self.teacher = None
        self.topk_cache = (TeacherTopKCache(config.teacher_topk_cache)
                           if config.teacher_topk_cache is not None else None)
        self.vllm_teacher = None  # teacher.engine=vllm: top-k log-probs from a vLLM engine
        if config.needs_teacher_model():
            teacher_source = config.teacher
            self.teacher = self._build(teacher_source.model_config(), teacher_source.init_from)
            self.teacher.requires_grad_(False).eval()
            if config.uses_vllm_teacher():  # exported once to the engine, then dropped
                self.vllm_teacher = VLLMTeacher.start(
                    self.teacher, teacher_source.model_config(), teacher_source.topk,
                    config.rollout, config.teacher_max_model_len(), config.seed, self.replica)
                self.teacher = None
        self.teacher_offload = (Offloader(self.teacher, self.device, config.teacher.offload)
                                if self.teacher is not None else None)

        self.ddp = DistributedDataParallel(config=self.student.config, module=self.student,
                                           ddp_config=DistributedDataParallelConfig())
        optim = config.optim
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=optim.lr, weight_decay=optim.weight_decay,
                            adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2,
                            clip_grad=optim.clip_grad, params_dtype=self.student.config.params_dtype),
            [self.ddp])
        on_policy, engine = objective in ON_POLICY_OBJECTIVES, config.rollout.engine
        self.engine = (EmbeddedEngine(self.student, self.model_config.vocab_size,
                                      decode=self.tokenizer.decode)
                       if on_policy and engine == "embedded" else None)
        self.vllm = (VLLMRollouts(config.rollout, self.model_config,
                                  config.data.max_prompt_tokens + config.sampling.max_new_tokens,
                                  config.seed, self.replica)
                     if on_policy and engine == "vllm" else None)
        self.prompts = PromptStream(LongBlocksLoader(config.data, self.tokenizer))
        self.step = 0

    # ---------------------------------------------------------------- building models

    def _build(self, model_config, init_from: str | None):
        from megatron_dgrpo.models.convert import load_megatron_checkpoint_into
        from megatron_dgrpo.models.provider import build_gpt_model

        model = build_gpt_model(model_config, self.config.parallel)
        if init_from is not None:
            load_megatron_checkpoint_into(model, init_from)
        return model

    def _frozen_copy(self, model):
        from megatron_dgrpo.models.provider import build_gpt_model

        copy = build_gpt_model(self.model_config, self.config.parallel)
        copy.load_state_dict(model.state_dict())
        return copy.requires_grad_(False).eval()

    # ---------------------------------------------------------------- one step

    def _logits(self, model, batch: SequenceBatch) -> torch.Tensor:
        """``[B, T, V_local]`` logits of this TP rank, padding columns masked."""
        logits = model(batch.tokens, batch.positions, None)
        return mask_padded_vocab(logits, self.model_config.vocab_size, self.tp_rank)

    def _outputs(self, model, batch: SequenceBatch):
        """What the loss reads from ``model``: ``[B, T, V_local]`` masked logits
        (materialized), or ``([B, T, H]`` final hidden states, ``[V_local, H]`` output
        weight) (fused: the logits are formed chunk by chunk inside the loss)."""
        if self.config.loss_impl == "fused":
            return final_hidden_states(model, batch.tokens, batch.positions), output_weight(model)
        return self._logits(model, batch)

    @torch.no_grad()
    def _token_logp(self, model, batch: SequenceBatch) -> torch.Tensor:
        """``[B, T]`` float32 log-probs of the targets under ``model``."""
        if self.config.loss_impl == "fused":
            hidden, weight = self._outputs(model, batch)
            return chunked_token_logp(hidden, weight, batch.targets, self.model_config.vocab_size,
                                      self.tp_group, self.config.loss_chunk_tokens)
        logits = self._logits(model, batch)
        terms = vocab_parallel_terms(logits.reshape(-1, logits.shape[-1]), None,
                                     batch.targets.reshape(-1), group=self.tp_group)
        return terms.logp.reshape(batch.targets.shape)

    def _batched_token_logp(self, model, batch: SequenceBatch,
                            plan: list[MicroBatch]) -> torch.Tensor:
        """``[B, T]`` float32 log-probs of the targets, one micro-batch at a time (0 past
        each micro-batch's width, where there are no loss tokens)."""
        out = torch.zeros(batch.targets.shape, dtype=torch.float32, device=self.device)
        for micro_batch in plan:
            out[micro_batch.start:micro_batch.stop, :micro_batch.width] = cp_all_gather(
                self._token_logp(model, micro_batch.sequences(batch)), self.cp_group)
        return out

    def _loss(self, token_batch: TokenBatch, batch: SequenceBatch, teacher_outputs):
        """The student's (through DDP) share of the global loss and its metrics."""
        config = self.config
        if config.loss_impl == "fused":
            hidden, weight = self._outputs(self.ddp, batch)
            teacher_hidden, teacher_weight = teacher_outputs or (None, None)
            return loss_from_hidden(config.loss, token_batch, hidden, weight, teacher_hidden,
                                    teacher_weight, self.tp_group, config.loss_chunk_tokens,
                                    vocab_size=self.model_config.vocab_size, fp8=config.loss_fp8)
        return loss_from_logits(config.loss, token_batch, self._outputs(self.ddp, batch),
                                teacher_outputs, self.tp_group)

    def _generate(self, examples: list[LongBlocksExample]) -> tuple[RolloutBatch, dict[str, float]]:
        """This DP rank's rollouts of its ``examples``, and engine metrics (vLLM start-up)."""
        seed = self.config.seed + 7919 * self.step + self.dp_rank
        params = SamplingParams(**{**asdict(self.config.sampling), "seed": seed})
        prompts = [e.prompt_ids for e in examples]
        if self.vllm is not None:  # the replica's own engine
            return self.vllm.generate(self.student, prompts, params)
        return self.engine.generate(prompts, params), {}

    def _sequences(self, examples: list[LongBlocksExample]) -> dict[str, Any]:
        """Rollouts and rewards (on-policy), or prompt + reference answer (SFT/KD)."""
        if self.engine is None and self.vllm is None:
            responses = [self.tokenizer.encode(self.tokenizer.render_response(e.user_message,
                                                                               e.reference_answer))
                         for e in examples]
            return {"batch": build_sequences([e.prompt_ids for e in examples], responses,
                                             align=self.sequence_align).to(self.device),
                    "examples": examples}
        rollouts, engine_metrics = self._generate(examples)
        owners = [examples[r.prompt_index] for r in rollouts.rollouts]
        texts = [(r.text if r.text is not None else self.tokenizer.decode(r.response_ids))
                 .split(IM_END, 1)[0] for r in rollouts.rollouts]
        rewards = torch.tensor([self.config.rewards.score(text, e.reference_answer,
                                                          e.metadata.get("task"))
                                for text, e in zip(texts, owners)], dtype=torch.float32,
                               device=self.device)
        batch = build_sequences([r.prompt_ids for r in rollouts.rollouts],
                                [r.response_ids for r in rollouts.rollouts],
                                align=self.sequence_align).to(self.device)
        return {"batch": batch, "examples": owners, "rewards": rewards,
                "group": self.config.sampling.n, "engine_metrics": engine_metrics,
                "rollout_logp": batch.per_token([r.logprobs for r in rollouts.rollouts]),
                "rollout_seconds": rollouts.seconds,
                "response_lengths": [len(r.response_ids) for r in rollouts.rollouts],
                "truncated": [r.finish_reason == "length" for r in rollouts.rollouts]}

    def _cached_topk(self, examples: list[LongBlocksExample],
                     batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher top-k ``[B, T, k]`` (ids, log-probs) from the cache, at the loss positions."""
        k = self.topk_cache.k
        indices = torch.zeros(*batch.loss_mask.shape, k, dtype=torch.long, device=self.device)
        logp = torch.zeros(*batch.loss_mask.shape, k, device=self.device)
        for row, example in enumerate(examples):
            cached_ids, cached_logp = self.topk_cache.lookup(example.id)
            positions = torch.nonzero(batch.loss_mask[row]).flatten()
            if len(positions) != len(cached_ids):
                raise ValueError(f"teacher cache has {len(cached_ids)} tokens for example "
                                 f"{example.id!r}, the batch {len(positions)}: built with another "
                                 "tokenizer or data?")
            indices[row, positions] = cached_ids.to(self.device)
            logp[row, positions] = cached_logp.to(self.device)
        return indices, logp

    def _accumulate_gradients(self, plan: list[MicroBatch], batch: SequenceBatch,
                              token_batch: TokenBatch) -> tuple[torch.Tensor, LossMetrics, float]:
        """Forward and backward of every micro-batch (teacher forward first, per micro-batch,
        so only one micro-batch's teacher outputs exist at a time); gradients accumulate in
        DDP's buffers. Returns this rank's loss, its metrics and the teacher's seconds."""
        loss, loss_metrics, teacher_seconds = torch.zeros((), device=self.device), LossMetrics(), 0.0
        with self.teacher_offload.on_device() if self.teacher_offload else nullcontext():
            for micro_batch in plan:
                sequences = micro_batch.sequences(batch)
                teacher_outputs = None
                if self.teacher is not None:
                    teacher_started = time.perf_counter()
                    with torch.no_grad():
                        teacher_outputs = self._outputs(self.teacher, sequences)
                    teacher_seconds += time.perf_counter() - teacher_started
                piece, piece_metrics = self._loss(micro_batch.tokens(token_batch), sequences,
                                                  teacher_outputs)
                # Megatron DDP averages gradients over the DP x CP ranks; our loss pieces
                # already sum to the global loss, so undo the average.
                (piece * self.dp_size * self.cp_size).backward()
                loss, loss_metrics = loss + piece.detach(), loss_metrics.merge(piece_metrics)
                del teacher_outputs
        return loss, loss_metrics, teacher_seconds

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns the step's metrics (identical on every rank)."""
        from megatron.core.distributed import finalize_model_grads

        self.step += 1
        per_rank = self.config.prompts_per_step
        step_examples = self.prompts.take(per_rank * self.dp_size)
        examples = step_examples[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]

        started = time.perf_counter()
        data = self._sequences(examples)
        batch: SequenceBatch = data["batch"]
        scored = time.perf_counter()

        loss_config = self.config.loss
        mask = batch.loss_mask
        weights = token_weights(mask, loss_config.aggregation,
                                global_token_count(mask, self.dp_group),
                                global_sequence_count=global_sequence_count(mask, self.dp_group))
        token_batch = TokenBatch(loss_mask=mask, weights=weights, targets=batch.targets)
        plan = plan_micro_batches(mask, self.config.micro_batch_size, self.sequence_align,
                                  self.cp_rank, self.cp_size)
        if self.topk_cache is not None:
            token_batch.teacher_topk_indices, token_batch.teacher_topk_logp = \
                self._cached_topk(data["examples"], batch)
        vllm_teacher_seconds = 0.0
        if self.vllm_teacher is not None:  # the whole batch in one engine call
            teacher_started = time.perf_counter()
            (token_batch.teacher_topk_indices, token_batch.teacher_topk_logp,
             token_batch.teacher_logp) = self.vllm_teacher.score(batch)
            vllm_teacher_seconds = time.perf_counter() - teacher_started
        if "rewards" in data:
            advantages = group_advantages(data["rewards"], data["group"],
                                          loss_config.adv_scale_by_std, loss_config.adv_eps)
            token_batch.advantages = broadcast_to_tokens(advantages, mask)
            # One optimizer step per rollout batch: pi_old is the policy being trained, so
            # the loss takes the detached training log-probs as old_logp (no extra forward).
            token_batch.rollout_logp = data["rollout_logp"]
        if self.reference is not None:
            token_batch.ref_logp = self._batched_token_logp(self.reference, batch, plan)
        scoring_done = time.perf_counter()

        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss, loss_metrics, teacher_seconds = self._accumulate_gradients(plan, batch, token_batch)
        teacher_seconds += vllm_teacher_seconds
        finalize_model_grads([self.ddp])
        grad_norm = global_grad_norm(self.ddp, self.tp_group)  # before any clipping
        lr = self.config.optim.lr_at(self.step, self.config.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        trained = time.perf_counter()
        if self.vllm is not None:
            data["engine_metrics"].update(self.vllm.sync(self.student, self.step))

        metrics = {"loss": _sum_over(loss.detach(), self.dp_cp_group), "optim/lr": lr,
                   "optim/grad_norm": grad_norm}
        metrics.update({f"policy/{k}": v for k, v in
                        all_reduce_metrics(loss_metrics, self.dp_cp_group).as_dict().items()})
        metrics.update(self._rollout_metrics(data))
        metrics.update(data.get("engine_metrics", {}))
        train_tokens = _sum_over(torch.tensor(float(mask.sum())), self.dp_group)
        metrics.update({
            "time/rollout_s": scored - started,
            "time/scoring_s": scoring_done - scored,
            # teacher forwards (inside time/train_s) or vLLM teacher scoring (time/scoring_s)
            "time/teacher_s": teacher_seconds,
            "time/train_s": trained - scoring_done,
            "throughput/train_tokens_per_s": train_tokens / max(trained - scoring_done, 1e-9),
            "memory/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        })
        if self.device.type == "cuda":
            metrics["memory/peak_gpu_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return metrics

    def _rollout_metrics(self, data: dict[str, Any]) -> dict[str, float]:
        """Rewards, pass rates (overall and per task family), response lengths and rollout
        throughput over the global batch (see :mod:`megatron_dgrpo.train.rollout_metrics`)."""
        if "rewards" not in data:
            return {}
        rewards = _gather(data["rewards"], self.dp_group).tolist()
        families = _gather_lists([family_of(e.metadata, e.source) for e in data["examples"]],
                                 self.dp_group)
        lengths = _gather_lists(data["response_lengths"], self.dp_group)
        metrics = rollout_metrics(rewards, families, lengths,
                                  _gather_lists(data["truncated"], self.dp_group))
        # DP ranks generate concurrently: the global rate is all tokens over the slowest rank.
        slowest = _max_over(data["rollout_seconds"], self.dp_group)
        metrics["throughput/rollout_tokens_per_s"] = sum(lengths) / max(slowest, 1e-9)
        return metrics


def _sum_over(value: torch.Tensor, group) -> float:
    value = value.detach().to(collective_device(group), dtype=torch.float64, copy=True)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(value, group=group)
    return float(value)


def _max_over(value: float, group) -> float:
    tensor = torch.tensor(value, dtype=torch.float64, device=collective_device(group))
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return float(tensor)


def _gather_lists(values: list, group) -> list:
    if group is None or dist.get_world_size(group) == 1:
        return values
    parts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, values, group=group)
    return [v for part in parts for v in part]


def _gather(values: torch.Tensor, group) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return values
    parts = [torch.empty_like(values) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, values, group=group)
    return torch.cat(parts)
