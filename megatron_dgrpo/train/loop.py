"""The training step of ``dgrpo train``, readable top to bottom (:meth:`Trainer.train_step`).

    examples  -> sequences (rollouts, or prompt + reference answer)    train/sources.py
              -> rewards -> group advantages                           data/rewards.py, algorithms/
              -> teacher signals for the whole batch (vLLM, cache)     train/sources.py
              -> reference log-probs (no grad)                         train/sources.py
              -> per micro-batch: teacher outputs, loss, backward      train/update.py
              -> optimizer step                                        train/update.py
              -> the sequence source follows the update (vLLM refit)   train/vllm_rollouts.py
              -> metrics

Run on every rank (``torchrun``); each data-parallel rank takes its own slice of the step's
prompts, and the loss is normalised over the whole global batch, so the update does not
depend on the split. With context parallelism the CP ranks of a replica hold the same
(whole) step batch and each runs the models on its load-balanced shard of every micro-batch
(:class:`~megatron_dgrpo.train.batch.MicroBatch`); the CP ranks' loss pieces add up to the
micro-batch's loss. With pipeline parallelism every stage runs its layers of each
micro-batch through Megatron's schedule and the loss runs on the last stage
(:mod:`megatron_dgrpo.train.update`); with ``pack_sequences`` the micro-batches are
packs of rows (:mod:`megatron_dgrpo.train.packing`). What varies by objective is read from
its registry entry (:class:`~megatron_dgrpo.algorithms.objectives.Objective`), never from
its name.

The old log-probs are the detached training log-probs (one optimizer step per rollout
batch: ``pi_old`` is the policy being trained).
"""

from __future__ import annotations

import resource
import time

import torch

from megatron_dgrpo.algorithms.advantages import broadcast_to_tokens, group_advantages
from megatron_dgrpo.algorithms.aggregation import token_weights
from megatron_dgrpo.algorithms.inputs import TokenBatch
from megatron_dgrpo.algorithms.metrics import LossMetrics
from megatron_dgrpo.data.chat import load_chat_tokenizer
from megatron_dgrpo.data.rewards import overlong_penalty
from megatron_dgrpo.data.longblocks import (
    LongBlocksConfig,
    LongBlocksLoader,
    require_usable_example,
    scan,
)
from megatron_dgrpo.data.mix import (
    ExampleStream,
    Lookahead,
    MixConfig,
    TokenShareMixer,
    reread_source,
)
from megatron_dgrpo.parallel.collectives import reduce_scalar
from megatron_dgrpo.parallel.context import (
    all_reduce_metrics,
    global_sequence_count,
    global_token_count,
    sequence_alignment,
)
from megatron_dgrpo.train.batch import MicroBatch, StepBatch, plan_micro_batches, used_lengths
from megatron_dgrpo.train.config import RunConfig
from megatron_dgrpo.train.guards import SkippedSteps, generate_with_retries, invalid_rewards
from megatron_dgrpo.train.packing import plan_packed_micro_batches
from megatron_dgrpo.train.rollout_metrics import step_rollout_metrics
from megatron_dgrpo.train.sources import (
    CachedTeacher,
    EmbeddedRollouts,
    FixedSequences,
    MegatronTeacher,
    SequenceSource,
    TeacherSource,
    TokenScorer,
)
from megatron_dgrpo.train.update import StudentOptimizer, StudentStep


def training_examples(data: LongBlocksConfig, short_data: LongBlocksConfig | None,
                      mix: MixConfig, seed: int, tokenizer) -> Lookahead:
    """The run's training examples: ``data`` alone, or mixed with ``short_data`` by token
    share (``mix``), readable ahead for asynchronous rollouts; each source in file order or
    shuffled per epoch (its ``shuffle_buffer``), seeded by ``seed`` and the source's name."""
    long = LongBlocksLoader(data, tokenizer)
    if short_data is None:
        return Lookahead(ExampleStream(long, data.shuffle_buffer, f"{seed}:long"))
    scan(short_data)
    short = LongBlocksLoader(short_data, tokenizer)
    return Lookahead(TokenShareMixer(
        reread_source(long, data.shuffle_buffer, f"{seed}:long"),
        reread_source(short, short_data.shuffle_buffer, f"{seed}:short"),
        lambda example: example.num_prompt_tokens, mix))


class Trainer:
    """Builds everything from a validated :class:`RunConfig` and runs steps; call on every rank."""

    def __init__(self, config: RunConfig):
        from megatron.core import parallel_state as ps

        from megatron_dgrpo.models.loading import build_model, require_tokenizer_fits
        from megatron_dgrpo.models.provider import initialize_parallel
        from megatron_dgrpo.parallel.replicas import model_replica

        self.config = config
        self.objective = config.loss.spec
        scan(config.data)  # refuses data with too many unusable rows, before any model work
        initialize_parallel(config.parallel, config.seed)
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.dp_group = ps.get_data_parallel_group()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.cp_group = ps.get_context_parallel_group()
        self.cp_rank, self.cp_size = (ps.get_context_parallel_rank(),
                                      ps.get_context_parallel_world_size())
        # Gradients and per-token sums span the data- and context-parallel ranks.
        self.dp_cp_group = ps.get_data_parallel_group(with_context_parallel=True)
        self.align = sequence_alignment(config.parallel.context_parallel,
                                        config.parallel.tensor_parallel,
                                        config.parallel.sequence_parallel)
        uses_vllm = config.uses_vllm_teacher() or config.uses_vllm_rollouts()
        self.replica = model_replica() if uses_vllm else None  # engines live on its leader

        self.tokenizer = load_chat_tokenizer(config.tokenizer)
        require_usable_example(config.data, self.tokenizer)  # e.g. every prompt too long
        self.model_config = config.student.model_config()
        require_tokenizer_fits(self.tokenizer, self.model_config, "the student")
        self.student = build_model(self.model_config, config.parallel, config.student.init_from)
        self.device = next(self.student.parameters()).device
        vocab_size = self.model_config.vocab_size
        self.temperature = config.policy_temperature()  # the trained policy: softmax(z / T)
        self.reference = None
        if config.loss.needs_reference:
            reference = build_model(self.model_config, config.parallel)
            reference.load_state_dict(self.student.state_dict())
            self.reference = TokenScorer(reference.requires_grad_(False).eval(), vocab_size,
                                         self.cp_group, config.loss_chunk_tokens)
        # pi_old of PPO updates: the live student scored before its first update of a step
        self.policy_scorer = TokenScorer(self.student, vocab_size, self.cp_group,
                                         config.loss_chunk_tokens)
        self.teacher = self._teacher_source()
        self.optim = StudentOptimizer(self.student, config.optim)
        self.student_step = StudentStep(config, self.optim.ddp, self.teacher, vocab_size,
                                        self.temperature)
        self.sequences = self._sequence_source()
        self.prompts = training_examples(config.data, config.short_data, config.mix,
                                         config.seed, self.tokenizer)
        self.step = 0
        self.skipped = SkippedSteps(config.max_skipped_steps)  # non-finite steps in a row

    @property
    def optimizer(self):
        """Megatron's optimizer (what checkpoints save and restore)."""
        return self.optim.optimizer

    def _teacher_source(self) -> TeacherSource | None:
        from megatron_dgrpo.models.loading import build_model
        from megatron_dgrpo.train.vllm_teacher import VLLMTeacher

        config = self.config
        if config.teacher_topk_cache is not None:
            return CachedTeacher(config.teacher_topk_cache)
        if not config.needs_teacher_model():
            return None
        source = config.teacher
        teacher_config = source.model_config()
        model = build_model(teacher_config, config.parallel, source.init_from)
        model.requires_grad_(False).eval()
        if config.uses_vllm_teacher():  # exported once to the engine, then dropped
            return VLLMTeacher.start(model, teacher_config, source.topk, config.rollout,
                                     config.teacher_max_model_len(), config.seed, self.replica)
        return MegatronTeacher(model, teacher_config.vocab_size, config.loss_impl == "fused",
                               self.device, source.offload)

    def _sequence_source(self) -> SequenceSource:
        from megatron_dgrpo.rollout.embedded import EmbeddedEngine
        from megatron_dgrpo.train.async_rollouts import AsyncRollouts
        from megatron_dgrpo.train.vllm_rollouts import VLLMRollouts

        config = self.config
        if not self.objective.on_policy:
            return FixedSequences(self.tokenizer, self.align, self.device, config.prompt_loss)
        if config.rollout.engine == "vllm":
            source = VLLMRollouts(config.rollout, self.student, self.model_config,
                                  config.sampling,
                                  config.data.max_prompt_tokens + config.sampling.max_new_tokens,
                                  config.seed, self.replica, self.tokenizer.decode, self.align,
                                  self.device)
            if config.rollout.staleness_bound == 0:
                return source
            return AsyncRollouts(source, config.rollout.staleness_bound,
                                 lambda: self._take_examples(ahead=True))
        engine = EmbeddedEngine(self.student, self.model_config.vocab_size,
                                decode=self.tokenizer.decode)
        return EmbeddedRollouts(engine, config.sampling, config.seed, self.dp_rank,
                                self.tokenizer.decode, self.align, self.device)

    def state_dict(self) -> dict:
        """The loop's part of a checkpoint (JSON): the example stream's position and what
        the sequence source has in flight; call on every rank."""
        return {"prompts": self.prompts.state_dict(), "sequences": self.sequences.state_dict(),
                "skipped_in_a_row": self.skipped.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.prompts.load_state_dict(state["prompts"])
        self.sequences.load_state_dict(state.get("sequences", {}))
        self.skipped.in_a_row = state.get("skipped_in_a_row", 0)

    # ---------------------------------------------------------------- one step

    def train_step(self) -> dict[str, float]:
        """One rollout batch and its optimizer step(s); returns the step's metrics
        (identical on every rank)."""
        config = self.config
        self.step += 1
        started = time.perf_counter()
        batch, metrics = self._collect_batch()  # sequences and their rewards
        generated = time.perf_counter()

        signals = self._token_signals(batch)
        plan = self._plan(batch.sequences)
        if self.reference is not None:
            signals.ref_logp = self.reference.token_logp(batch.sequences, plan, self.temperature)
        if config.updates_per_step > 1:  # pi_old: the weights that sampled, before any update
            signals.old_logp = self.policy_scorer.token_logp(batch.sequences, plan,
                                                             self.temperature)
        scored = time.perf_counter()

        loss, loss_metrics, optim_metrics = self._update(batch, signals)
        trained = time.perf_counter()
        metrics.update(optim_metrics)
        metrics.update(self.sequences.after_step(self.step))  # e.g. refit the vLLM engine

        metrics["loss"] = loss
        metrics.update({f"policy/{k}": v for k, v in loss_metrics.as_dict().items()})
        if batch.rewards is not None:
            metrics.update(step_rollout_metrics(batch, self.dp_group))
        metrics.update(self._step_costs(batch, started, generated, scored, trained))
        return metrics

    def _take_examples(self, ahead: bool = False) -> list:
        """This rank's slice of the next ``prompts_per_step x DP`` examples (``ahead``: read
        ahead, left for the next take)."""
        per_rank = self.config.prompts_per_step
        step_examples = (self.prompts.peek if ahead else self.prompts.take)(per_rank * self.dp_size)
        return step_examples[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]

    def _collect_batch(self) -> tuple[StepBatch, dict[str, float]]:
        """This rank's sequences of the step, their rewards (on-policy), and the overlong
        treatment; with ``dynamic_sampling.mode=drop``, further rounds replace the groups
        whose rewards are all equal."""
        config = self.config
        batch, metrics = self._scored(self._take_examples(), draw=0)
        if config.dynamic_sampling.mode == "drop":
            batch, refill_metrics = self._refill(batch)
            metrics.update(refill_metrics)
        if self.objective.uses_rewards:
            flat = (batch.group_rewards() == batch.group_rewards()[:, :1]).all(dim=1)
            metrics["groups/zero_advantage_frac"] = (
                reduce_scalar(flat.sum(), "sum", self.dp_group)
                / reduce_scalar(batch.num_groups, "sum", self.dp_group))
        if self.prompts.long_token_share is not None:  # realised share of prompt tokens so far
            metrics["data/long_token_share"] = self.prompts.long_token_share
        if config.rewards.overlong == "mask" and batch.rewards is not None:
            truncated = torch.tensor(batch.truncated, device=self.device)
            batch.sequences.loss_mask &= ~truncated[:, None]
        return batch, metrics

    def _scored(self, examples: list, draw: int) -> tuple[StepBatch, dict[str, float]]:
        """Sequences of ``examples`` (generation round ``draw`` of the step) with their
        outcome rewards when on-policy (trained on by grpo/dgrpo, logged for every
        on-policy objective), the overlong penalty included."""
        rewards_config = self.config.rewards
        batch, metrics = generate_with_retries(self.sequences, examples, self.step, draw,
                                               self.config.rollout.retries)
        if self.objective.on_policy:
            rewards = rewards_config.score_all(batch.responses, batch.references, batch.tasks)
            if rewards_config.overlong == "penalty":
                budget = self.config.sampling.max_new_tokens
                rewards = [r + rewards_config.overlong_weight
                           * overlong_penalty(n, budget, rewards_config.overlong_buffer)
                           for r, n in zip(rewards, batch.response_lengths)]
            # a failed reward (NaN) gives its sample zero weight, counted
            batch.rewards, invalid = invalid_rewards(
                torch.tensor(rewards, dtype=torch.float32, device=self.device), batch.group_size)
            batch.sequences.loss_mask &= ~invalid[:, None]
            metrics["reward/invalid"] = reduce_scalar(invalid.sum(), "sum", self.dp_group)
        return batch, metrics

    def _refill(self, batch: StepBatch) -> tuple[StepBatch, dict[str, float]]:
        """DAPO's dynamic sampling: keep the groups with varied rewards, draw and sample more
        prompts (every rank in lockstep, the example stream stays global) until each rank has
        ``prompts_per_step`` of them or ``max_rounds`` rounds are done; a rank still short
        fills up with groups whose rewards are all equal."""
        wanted, rounds = self.config.prompts_per_step, self.config.dynamic_sampling.max_rounds
        informative: list[StepBatch] = []
        flat: list[StepBatch] = []
        for draw in range(rounds):
            if draw:
                batch, _ = self._scored(self._take_examples(), draw)
            rewards = batch.group_rewards()
            varied = (rewards != rewards[:, :1]).any(dim=1).tolist()
            informative.append(batch.select_groups([g for g, v in enumerate(varied) if v]))
            flat.append(batch.select_groups([g for g, v in enumerate(varied) if not v]))
            have = sum(b.num_groups for b in informative)
            if reduce_scalar(float(have < wanted), "max", self.dp_group) == 0:
                break
        kept = StepBatch.concatenate(informative)
        kept = kept.select_groups(range(min(wanted, kept.num_groups)))
        short = wanted - kept.num_groups
        if short:
            kept = StepBatch.concatenate([kept, StepBatch.concatenate(flat).select_groups(
                range(short))])
        return kept, {"groups/rounds": float(draw + 1),
                      "groups/short": reduce_scalar(short, "sum", self.dp_group)}

    def _plan(self, sequences) -> list:
        """The micro-batches of ``sequences``: packs with ``pack_sequences``, else row
        groups of ``micro_batch_size``."""
        if self.config.pack_sequences:
            return plan_packed_micro_batches(sequences.loss_mask, self.config.pack_tokens,
                                             self.align, self.cp_rank, self.cp_size)
        return plan_micro_batches(sequences.loss_mask, self.config.micro_batch_size,
                                  self.align, self.cp_rank, self.cp_size)

    def _loss_weights(self, mask: torch.Tensor) -> torch.Tensor:
        """Aggregation weights of the loss tokens ``mask`` ``[B, T]`` with the normalisers of
        the global (all DP ranks) batch of which ``mask`` is this rank's share."""
        loss_config = self.config.loss
        rows = (reduce_scalar(mask.shape[0], "sum", self.dp_group)
                if loss_config.aggregation == "constant_length"
                else global_sequence_count(mask, self.dp_group))
        return token_weights(mask, loss_config.aggregation, global_token_count(mask, self.dp_group),
                             global_sequence_count=rows,
                             length_norm=loss_config.length_norm or self.config.sampling.max_new_tokens)

    def _token_signals(self, batch: StepBatch) -> TokenBatch:
        """What the loss knows per token before the student's forward: global aggregation
        weights, group advantages, engine log-probs, the teacher's batch-level scores."""
        loss_config, mask = self.config.loss, batch.sequences.loss_mask
        signals = TokenBatch(loss_mask=mask, weights=self._loss_weights(mask),
                             targets=batch.sequences.targets, rollout_logp=batch.rollout_logp)
        if self.objective.uses_rewards:
            advantages = group_advantages(batch.rewards, batch.group_size,
                                          loss_config.adv_scale_by_std, loss_config.adv_eps,
                                          loss_config.adv_std_unbiased)
            signals.advantages = broadcast_to_tokens(advantages, mask)
        scores = self.teacher.score(batch) if self.teacher is not None else None
        if scores is not None:
            signals.teacher_topk_indices, signals.teacher_topk_logp = (scores.topk_indices,
                                                                       scores.topk_logp)
            signals.teacher_logp = scores.logp
        return signals

    def _update(self, batch: StepBatch, signals: TokenBatch
                ) -> tuple[float, LossMetrics, dict[str, float]]:
        """``ppo_epochs`` passes over ``ppo_mini_batches`` slices of the prompt groups, one
        optimizer step each (one step over everything by default). Returns the mean loss
        over the updates, their metrics (means averaged, extremes over all) and the
        optimizer's metrics (mean gradient norm) with ``train/padding_fraction``: the share
        of the token positions the student's forwards ran over that are padding."""
        config = self.config
        rows, slices = batch.sequences.tokens.shape[0], config.ppo_mini_batches
        losses, metrics, optim = [], [], []
        used, computed = 0, 0
        for _ in range(config.ppo_epochs):
            for index in range(slices):
                part, part_signals = batch.sequences, signals
                if slices > 1:
                    rows_of = MicroBatch(index * rows // slices, (index + 1) * rows // slices,
                                         batch.sequences.tokens.shape[1])
                    part, part_signals = rows_of.sequences(part), rows_of.tokens(signals)
                    part_signals.weights = self._loss_weights(part.loss_mask)
                self.optim.zero_grad()
                plan = self._plan(part)
                lengths = used_lengths(part.loss_mask)
                used += sum(lengths[row] for micro_batch in plan for row in micro_batch.rows)
                computed += sum(micro_batch.computed_tokens for micro_batch in plan)
                loss, loss_metrics = self._accumulate_gradients(plan, part, part_signals)
                losses.append(reduce_scalar(loss, "sum", self.dp_cp_group))
                optim.append(self.optim.step(self.step, config.steps, losses[-1]))
                metrics.append(all_reduce_metrics(loss_metrics, self.dp_cp_group))
        optim_metrics = optim[0] if len(optim) == 1 else {
            "optim/lr": optim[-1]["optim/lr"], "optim/updates": float(len(optim)),
            "optim/grad_norm": sum(o["optim/grad_norm"] for o in optim) / len(optim),
            "optim/skipped": float(any(o["optim/skipped"] for o in optim))}
        optim_metrics["train/padding_fraction"] = 1 - (reduce_scalar(used, "sum", self.dp_group)
                                                       / reduce_scalar(computed, "sum",
                                                                       self.dp_group))
        return sum(losses) / len(losses), LossMetrics.average(metrics), optim_metrics

    def _accumulate_gradients(self, plan: list, sequences,
                              signals: TokenBatch) -> tuple[torch.Tensor, LossMetrics]:
        """Forward and backward of every micro-batch of ``plan``; gradients accumulate in
        DDP's buffers. Returns this rank's loss and its metrics (the same on every pipeline
        stage)."""
        return self.student_step.accumulate(plan, sequences, signals, self.step)

    def _step_costs(self, batch: StepBatch, started: float, generated: float, scored: float,
                    trained: float) -> dict[str, float]:
        """Where the step's time and memory went."""
        train_tokens = reduce_scalar(batch.sequences.loss_mask.sum(), "sum", self.dp_group)
        costs = {
            "time/rollout_s": generated - started,
            "time/scoring_s": scored - generated,
            # teacher forwards (inside time/train_s) or vLLM / cache scoring (time/scoring_s)
            "time/teacher_s": self.teacher.elapsed() if self.teacher is not None else 0.0,
            "time/train_s": trained - scored,
            "throughput/train_tokens_per_s": train_tokens / max(trained - scored, 1e-9),
            "memory/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }
        if self.device.type == "cuda":
            costs["memory/peak_gpu_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return costs
