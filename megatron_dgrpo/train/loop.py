"""The training loop of ``dgrpo train``: one step, readable top to bottom.

    prompts -> G rollouts per prompt (embedded engine) -> rewards -> group advantages
      -> scoring without grad (old log-probs, teacher logits, reference log-probs)
      -> loss (megatron_dgrpo.parallel.materialized) -> backward -> Megatron optimizer step
      -> metrics, checkpoint

SFT and KD skip the rollouts and train on prompt + reference answer. Run on every rank
(``torchrun``); each data-parallel rank takes its own slice of the step's prompts, and the
loss is normalised over the whole global batch, so the update does not depend on the split.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist

from megatron_dgrpo.algorithms.advantages import broadcast_to_tokens, group_advantages
from megatron_dgrpo.algorithms.aggregation import token_weights
from megatron_dgrpo.algorithms.inputs import TokenBatch
from megatron_dgrpo.data.chat import IM_END, load_chat_tokenizer
from megatron_dgrpo.data.longblocks import LongBlocksExample, LongBlocksLoader
from megatron_dgrpo.parallel.context import all_reduce_metrics, global_sequence_count, global_token_count
from megatron_dgrpo.parallel.materialized import loss_from_logits
from megatron_dgrpo.parallel.vocab import vocab_parallel_terms
from megatron_dgrpo.rollout.engine import SamplingParams
from megatron_dgrpo.teacher_cache import TeacherTopKCache
from megatron_dgrpo.train.config import ON_POLICY_OBJECTIVES, RunConfig
from megatron_dgrpo.train.sequences import SequenceBatch, build_sequences

# Logit given to the rows Megatron adds to pad the vocabulary for TP: far below any real
# logit, so they carry no probability, yet finite, so 0 * logit stays 0 in entropy and KL.
PADDED_VOCAB_LOGIT = -1.0e4


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
    ids = torch.arange(tp_rank * local, (tp_rank + 1) * local)
    if ids[-1] < vocab_size:
        return logits
    return logits.masked_fill(ids >= vocab_size, PADDED_VOCAB_LOGIT)


class Trainer:
    """Builds everything from a validated :class:`RunConfig` and runs steps; call on every rank."""

    def __init__(self, config: RunConfig):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
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

        self.tokenizer = load_chat_tokenizer(config.tokenizer)
        self.model_config = config.student.model_config()
        if self.tokenizer.vocab_size > self.model_config.vocab_size:
            raise ValueError(f"tokenizer {config.tokenizer} has {self.tokenizer.vocab_size} "
                             f"tokens, the student's vocabulary only {self.model_config.vocab_size}")
        self.student = self._build(self.model_config, config.student.init_from)
        self.reference = self._frozen_copy(self.student) if config.needs_reference() else None
        self.teacher = None
        self.topk_cache = (TeacherTopKCache(config.teacher_topk_cache)
                           if config.teacher_topk_cache is not None else None)
        if config.needs_teacher_model():
            teacher_source = config.teacher
            self.teacher = self._build(teacher_source.model_config(), teacher_source.init_from)
            self.teacher.requires_grad_(False).eval()

        self.ddp = DistributedDataParallel(config=self.student.config, module=self.student,
                                           ddp_config=DistributedDataParallelConfig())
        optim = config.optim
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=optim.lr, weight_decay=optim.weight_decay,
                            adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2,
                            clip_grad=optim.clip_grad, params_dtype=self.student.config.params_dtype),
            [self.ddp])
        self.engine = (EmbeddedEngine(self.student, self.model_config.vocab_size,
                                      decode=self.tokenizer.decode)
                       if objective in ON_POLICY_OBJECTIVES else None)
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

    @torch.no_grad()
    def _token_logp(self, model, batch: SequenceBatch) -> torch.Tensor:
        logits = self._logits(model, batch)
        terms = vocab_parallel_terms(logits.reshape(-1, logits.shape[-1]), None,
                                     batch.targets.reshape(-1), group=self.tp_group)
        return terms.logp.reshape(batch.targets.shape)

    def _sequences(self, examples: list[LongBlocksExample]) -> dict[str, Any]:
        """Rollouts and rewards (on-policy), or prompt + reference answer (SFT/KD)."""
        if self.engine is None:
            responses = [self.tokenizer.encode(self.tokenizer.render_response(e.user_message,
                                                                               e.reference_answer))
                         for e in examples]
            return {"batch": build_sequences([e.prompt_ids for e in examples], responses),
                    "examples": examples}
        params = SamplingParams(**{**asdict(self.config.sampling),
                                   "seed": self.config.seed + 7919 * self.step + self.dp_rank})
        rollouts = self.engine.generate([e.prompt_ids for e in examples], params)
        group = params.n
        owners = [examples[r.prompt_index] for r in rollouts.rollouts]
        texts = [r.text.split(IM_END, 1)[0] for r in rollouts.rollouts]
        rewards = torch.tensor([self.config.rewards.score(text, e.reference_answer,
                                                          e.metadata.get("task"))
                                for text, e in zip(texts, owners)], dtype=torch.float32)
        batch = build_sequences([r.prompt_ids for r in rollouts.rollouts],
                                [r.response_ids for r in rollouts.rollouts])
        return {"batch": batch, "examples": owners, "rewards": rewards, "group": group,
                "rollout_logp": batch.per_token([r.logprobs for r in rollouts.rollouts]),
                "rollout_seconds": rollouts.seconds,
                "rollout_tokens": rollouts.num_generated_tokens}

    def _cached_topk(self, examples: list[LongBlocksExample],
                     batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher top-k ``[B, T, k]`` (ids, log-probs) from the cache, at the loss positions."""
        k = self.topk_cache.k
        indices = torch.zeros(*batch.loss_mask.shape, k, dtype=torch.long)
        logp = torch.zeros(*batch.loss_mask.shape, k)
        for row, example in enumerate(examples):
            cached_ids, cached_logp = self.topk_cache.lookup(example.id)
            positions = torch.nonzero(batch.loss_mask[row]).flatten()
            if len(positions) != len(cached_ids):
                raise ValueError(f"teacher cache has {len(cached_ids)} tokens for example "
                                 f"{example.id!r}, the batch {len(positions)}: built with another "
                                 "tokenizer or data?")
            indices[row, positions], logp[row, positions] = cached_ids, cached_logp
        return indices, logp

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
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self._logits(self.teacher, batch)
        if self.topk_cache is not None:
            token_batch.teacher_topk_indices, token_batch.teacher_topk_logp = \
                self._cached_topk(data["examples"], batch)
        if "rewards" in data:
            advantages = group_advantages(data["rewards"], data["group"],
                                          loss_config.adv_scale_by_std, loss_config.adv_eps)
            token_batch.advantages = broadcast_to_tokens(advantages, mask)
            token_batch.old_logp = self._token_logp(self.student, batch)
            token_batch.rollout_logp = data["rollout_logp"]
        if self.reference is not None:
            token_batch.ref_logp = self._token_logp(self.reference, batch)
        scoring_done = time.perf_counter()

        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss, loss_metrics = loss_from_logits(loss_config, token_batch,
                                              self._logits(self.ddp, batch), teacher_logits,
                                              self.tp_group)
        # Megatron DDP averages gradients over DP ranks; our loss pieces already sum to the
        # global loss, so undo the average.
        (loss * self.dp_size).backward()
        finalize_model_grads([self.ddp])
        self.optimizer.step()
        trained = time.perf_counter()

        metrics = {"loss": _sum_over(loss.detach(), self.dp_group)}
        metrics.update({f"policy/{k}": v for k, v in
                        all_reduce_metrics(loss_metrics, self.dp_group).as_dict().items()})
        metrics.update(self._rollout_metrics(data))
        train_tokens = _sum_over(torch.tensor(float(mask.sum())), self.dp_group)
        metrics.update({
            "time/rollout_s": scored - started,
            "time/scoring_s": scoring_done - scored,
            "time/train_s": trained - scoring_done,
            "throughput/train_tokens_per_s": train_tokens / max(trained - scoring_done, 1e-9),
            "memory/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        })
        return metrics

    def _rollout_metrics(self, data: dict[str, Any]) -> dict[str, float]:
        if "rewards" not in data:
            return {}
        rewards = _gather(data["rewards"], self.dp_group)
        families = _gather_lists([e.metadata.get("task_family") or "public"
                                  for e in data["examples"]], self.dp_group)
        metrics = {"reward/mean": rewards.mean().item(), "reward/std": rewards.std(unbiased=False).item(),
                   "reward/pass_rate": (rewards >= 1.0).float().mean().item(),
                   "response/length_mean": _sum_over(torch.tensor(float(data["rollout_tokens"])),
                                                     self.dp_group) / rewards.numel(),
                   "throughput/rollout_tokens_per_s": data["rollout_tokens"] / data["rollout_seconds"]}
        for family in sorted(set(families)):
            chosen = torch.tensor([f == family for f in families])
            metrics[f"reward/{family}"] = rewards[chosen].mean().item()
        return metrics


def _sum_over(value: torch.Tensor, group) -> float:
    value = value.detach().clone().double()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(value, group=group)
    return float(value)


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
