"""GPU memory per device, by arithmetic, before any work: does a run's layout fit?

Pure arithmetic over the run config (no torch, no CUDA); :meth:`RunConfig.validate
<megatron_dgrpo.train.config.RunConfig.validate>` calls :func:`check_memory` on CUDA
runtimes and refuses a layout that cannot fit, naming the term that does not fit;
``dgrpo train --dry-run`` prints :meth:`MemoryPlan.summary`, and so does rank 0 at start-up.

Notation: ``L`` layers, ``h`` hidden, ``F`` FFN, ``a`` query heads, ``g`` key/value heads,
``d`` head_dim, ``V`` vocabulary (padded to Megatron's multiple of 128 x TP), ``t`` TP,
``p`` PP, ``c`` CP, ``e`` the engine's tensor parallelism. Bytes are exact integers; GiB =
2^30 bytes.

**Parameters of one TP x PP shard** (:func:`shard_parameters`): per layer
``(h(a + 2g)d + adh + 3hF) / t`` (QKV, output projection, gate/up/down) plus the replicated
norms ``2h + 2d``; embedding ``Vh / t`` on the first stage, output layer ``Vh / t`` (untied)
and final norm ``h`` on the last; the largest stage counts.

**Terms, per GPU** (the worst GPU: one that also hosts an engine worker when there is one):

* student (trained), as this trainer lays it out (Megatron DDP with its default bf16
  gradient buffer, Megatron's non-distributed mixed-precision Adam): bf16 weights 2 + DDP
  gradient buffer 2 + fp32 main weights 4 + fp32 main gradients 4 (allocated at the step,
  kept until the next ``zero_grad``) + Adam moments 8 = **20 bytes per shard parameter**;
  fp32 students: weights 4 + gradients 4 + Adam 8 = 16. Resident in every phase.
* teacher (Megatron, frozen): 2 (bf16) or 4 bytes per shard parameter; in host memory while
  the engine samples with ``teacher.offload``; none with ``teacher.engine: vllm`` (exported
  to its engine, then dropped). Reference model (``loss.needs_reference``): the same.
* activations of one micro-batch (:func:`activation_bytes`): ``tokens / c`` per CP rank; per
  token and layer the bf16 tensors saved for backward, in elements: norm inputs and outputs
  ``4h``; q, k, v after their norms and RoPE, q and k before them, the attention output
  ``3(a + g)d``; gate and up outputs and the SwiGLU output ``3F``. With sequence parallelism
  all of it is divided by ``t``; without, the ``4h`` part is not (Korthikanti et al. 2022,
  flash attention: no ``s^2`` term). For Qwen3-8B this is ``33.5 h`` bytes per token and
  layer (their generic factor: ``34``). Pipeline stages hold ``p`` micro-batches in flight
  (1F1B), each of ``L / p`` layers. With ``v`` virtual stages per rank the first rank holds
  ``v p + p - 1`` chunk forwards in flight (Megatron's interleaved warm-up, ``2 (p - 1) +
  (v - 1) p``, plus one), each of ``L / (p v)`` layers: ``L (1 + (p - 1) / (p v))``
  layers' worth (Narayanan et al. 2021).
* fused loss (:func:`loss_bytes`): output-weight gradient ``V/t x h`` fp32, hidden-state
  gradient ``M x h`` fp32 (``M``: loss tokens on the rank, at most the response budget of
  the micro-batch), three ``chunk x V/t`` fp32 chunk buffers (student and teacher logits,
  probabilities: on a GPU the fused loss's probability block is the whole chunk), the
  student's and teacher's
  final hidden states ``tokens / c x h``. Materialised loss: three ``tokens / c x V/t`` fp32
  logits-sized buffers instead of the chunks.
* teacher forward (no grad): one layer's working set ``tokens / c x (h + (3F + (a + 2g)d) /
  t)`` bf16.
* vLLM engine, inside ``gpu_memory_utilization x GPU`` (:func:`engine_terms`): weights per
  engine-TP shard (engine dtype) + KV cache ``max_num_seqs x max_model_len x L x 2 x
  max(1, g / e) x d x bytes`` (one sequence when ``max_num_seqs`` is unset: vLLM's own
  start-up requirement) + its profiling peak (``ENGINE_PROFILE_TOKENS`` tokens through the
  widest layer plus fp32 logits of the concurrent sequences) + ``ENGINE_GRAPH_GIB``. On the
  trainer's side an engine takes ``gpu_memory_utilization x GPU`` while awake (always, for
  the vLLM teacher; with ``rollout.sleep_level: 0``, during training too) and
  ``ENGINE_GRAPH_GIB`` while asleep.
* embedded engine: its static KV cache for the rank's rollouts at full length.
* refit: the gathered bucket and its shards, ``2 x refit_bucket_mb``.
* ``TRAINER_RESERVE_GIB`` for the trainer process's CUDA context, NCCL buffers and
  allocator slack (an allowance, not a measurement).

**Phases**: *rollout and refit* (trainer resident state + awake engines + refit buckets),
*training* (resident state + teacher + activations + loss + sleeping engines), and the
*vLLM engine* budget. Each must fit; the first that does not is reported with its largest
term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_dgrpo.models.config import ModelConfig
    from megatron_dgrpo.train.config import RunConfig

GIB = 2 ** 30
TRAINER_RESERVE_GIB = 2.0  # CUDA context, NCCL buffers, allocator slack (allowance)
ENGINE_GRAPH_GIB = 1.0  # vLLM's CUDA graphs and worker context (allowance)
ENGINE_PROFILE_TOKENS = 16384  # vLLM's default chunked-prefill budget for offline LLMs
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class Term:
    """One allocation: what it is and its bytes per GPU."""

    name: str
    bytes: int


@dataclass(frozen=True)
class Budget:
    """A phase's terms against what the phase may use (bytes per GPU)."""

    phase: str
    terms: tuple[Term, ...]
    capacity: int
    capacity_name: str

    @property
    def total(self) -> int:
        return sum(term.bytes for term in self.terms)

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    @property
    def largest(self) -> Term:
        return max(self.terms, key=lambda term: term.bytes)


@dataclass(frozen=True)
class MemoryPlan:
    """Every phase's budget of one GPU (the worst GPU of the layout)."""

    budgets: tuple[Budget, ...]

    def check(self) -> None:
        """Raise ValueError naming the first phase that does not fit and its largest term."""
        for budget in self.budgets:
            if not budget.fits:
                over = budget.total - budget.capacity
                raise ValueError(
                    f"memory per GPU: the {budget.phase} phase needs {gib(budget.total)} of "
                    f"{budget.capacity_name} {gib(budget.capacity)} ({gib(over)} over); largest "
                    f"term: {budget.largest.name} = {gib(budget.largest.bytes)}. Terms: "
                    + "; ".join(f"{t.name} {gib(t.bytes)}" for t in budget.terms)
                    + ". Shard more (parallel.tensor_parallel, context_parallel, "
                    "rollout.engine_tensor_parallel), offload the teacher, lower "
                    "rollout.max_num_seqs or micro_batch_size, or set parallel.gpu_memory_gib "
                    "to the GPU's real size")

    def summary(self) -> str:
        """A plain-text table of every phase (for logs and ``--dry-run``)."""
        lines = []
        for budget in self.budgets:
            verdict = "fits" if budget.fits else "DOES NOT FIT"
            lines.append(f"{budget.phase}: {gib(budget.total)} of {budget.capacity_name} "
                         f"{gib(budget.capacity)} ({verdict})")
            lines.extend(f"  {term.name:<66} {gib(term.bytes):>10}" for term in budget.terms)
        return "\n".join(lines)


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB"


# ---------------------------------------------------------------------------------------
# Pure terms


def layer_parameters(model: ModelConfig, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank (norms replicated)."""
    h, d = model.hidden_size, model.head_dim
    sharded = (h * (model.num_attention_heads + 2 * model.num_query_groups) * d
               + model.num_attention_heads * d * h + 3 * h * model.ffn_hidden_size)
    return sharded // tp + 2 * h + 2 * d


def shard_parameters(model: ModelConfig, tp: int, pp: int) -> int:
    """Parameters on the largest pipeline stage's TP shard (see the module docstring)."""
    embedding = model.padded_vocab_size(tp) * model.hidden_size // tp
    layers = model.num_layers // pp * layer_parameters(model, tp)
    # the output layer: its own weight, or at PP > 1 the last stage's copy of a tied one
    output = 0 if model.tie_word_embeddings and pp == 1 else embedding
    if pp == 1:
        return embedding + layers + model.hidden_size + output
    return max(embedding + layers, layers + model.hidden_size + output)


def student_bytes_per_parameter(params_dtype: str) -> int:
    """Weights, gradients and Adam states of one trained parameter (module docstring)."""
    return 20 if params_dtype == "bf16" else 16


def activation_elements_per_token(model: ModelConfig, tp: int, sequence_parallel: bool
                                  ) -> float:
    """Elements saved for backward per token and layer on one TP rank (module docstring)."""
    norms = 4 * model.hidden_size
    sharded = (3 * (model.num_attention_heads + model.num_query_groups) * model.head_dim
               + 3 * model.ffn_hidden_size)
    return (norms + sharded) / tp if sequence_parallel else norms + sharded / tp


def activation_bytes(model: ModelConfig, tokens_per_rank: int, tp: int, pp: int,
                     sequence_parallel: bool, virtual_stages: int = 1) -> int:
    """Saved activations of the micro-batches the first stage holds (1F1B: ``p`` in flight,
    ``L / p`` layers each, ``L`` layers' worth; interleaved over ``virtual_stages = v > 1``
    chunks: ``v p + p - 1`` chunk forwards of ``L / (p v)`` layers), bf16 or fp32 by the
    model's dtype."""
    per_token = activation_elements_per_token(model, tp, sequence_parallel)
    if virtual_stages == 1:
        layers_in_flight = model.num_layers // pp * pp
    else:
        layers_in_flight = (model.num_layers // (pp * virtual_stages)
                            * (virtual_stages * pp + pp - 1))
    return math.ceil(layers_in_flight * tokens_per_rank * per_token
                     * DTYPE_BYTES[model.params_dtype])


def loss_bytes(model: ModelConfig, tokens_per_rank: int, loss_tokens: int, tp: int,
               fused: bool, chunk_tokens: int | None, has_teacher: bool) -> int:
    """The loss's buffers beyond the models (module docstring), fp32 logits."""
    local_vocab = model.padded_vocab_size(tp) // tp
    h, act = model.hidden_size, DTYPE_BYTES[model.params_dtype]
    models = 2 if has_teacher else 1
    hidden = models * tokens_per_rank * h * act
    if not fused:
        return hidden + 3 * tokens_per_rank * local_vocab * 4
    from megatron_dgrpo.parallel.vocab import fused_chunk_tokens  # the fused loss's own rule

    chunk = chunk_tokens or fused_chunk_tokens(local_vocab, h)
    chunk = min(chunk, max(loss_tokens, 1))
    # student and teacher logits + the probabilities (on a GPU a block is the whole chunk)
    return hidden + local_vocab * h * 4 + loss_tokens * h * 4 + 3 * chunk * local_vocab * 4


def forward_working_set(model: ModelConfig, tokens_per_rank: int, tp: int) -> int:
    """One layer's transient of a no-grad forward (the teacher's)."""
    wide = (3 * model.ffn_hidden_size
            + (model.num_attention_heads + 2 * model.num_query_groups) * model.head_dim)
    return tokens_per_rank * (model.hidden_size + wide // tp) * DTYPE_BYTES[model.params_dtype]


def kv_cache_bytes(model: ModelConfig, tokens: int, tp: int, dtype_bytes: int,
                   layers: int | None = None) -> int:
    """Keys and values of ``tokens`` tokens on one TP rank (heads replicated when
    ``tp`` exceeds them, as vLLM does)."""
    kv_heads = max(1, model.num_query_groups // tp)
    return ((layers or model.num_layers) * 2 * kv_heads * model.head_dim * dtype_bytes
            * tokens)


def engine_terms(model: ModelConfig, engine_tp: int, dtype_bytes: int, max_model_len: int,
                 max_num_seqs: int | None, label: str) -> list[Term]:
    """One vLLM engine's allocations on each of its GPUs (module docstring)."""
    h, vocab = model.hidden_size, model.vocab_size
    vocab_rows = math.ceil(vocab / engine_tp)
    weights = (model.num_layers * layer_parameters(model, engine_tp)
               + vocab_rows * h * (1 if model.tie_word_embeddings else 2) + h) * dtype_bytes
    seqs = max_num_seqs or 1
    wide = (2 * model.ffn_hidden_size
            + (model.num_attention_heads + 2 * model.num_query_groups) * model.head_dim)
    profile = (ENGINE_PROFILE_TOKENS * (h + wide // engine_tp) * dtype_bytes
               + min(seqs, ENGINE_PROFILE_TOKENS) * vocab_rows * 4)
    kv_name = (f"{label} KV cache ({seqs} x {max_model_len} tokens)" if max_num_seqs
               else f"{label} KV cache (1 x {max_model_len} tokens; max_num_seqs unset)")
    return [Term(f"{label} weights (engine TP {engine_tp} shard)", weights),
            Term(kv_name, kv_cache_bytes(model, seqs * max_model_len, engine_tp, dtype_bytes)),
            Term(f"{label} profiling peak (prefill chunk, sampler logits)", profile),
            Term(f"{label} CUDA graphs and context (allowance)",
                 int(ENGINE_GRAPH_GIB * GIB))]


# ---------------------------------------------------------------------------------------
# The plan of a run


def plan_memory(config: RunConfig, gpu_bytes: int) -> MemoryPlan:
    """Every phase's budget of the worst GPU for ``config`` on GPUs of ``gpu_bytes``."""
    parallel, rollout, spec = config.parallel, config.rollout, config.loss.spec
    tp, pp, cp = parallel.tensor_parallel, parallel.pipeline_parallel, parallel.context_parallel
    student = config.student.model_config()
    act = DTYPE_BYTES[student.params_dtype]
    student_shard = shard_parameters(student, tp, pp)
    resident = [Term(f"student weights + grads + Adam "
                     f"({student_bytes_per_parameter(student.params_dtype)} B x "
                     f"{student_shard / 1e6:,.0f}M shard params)",
                     student_shard * student_bytes_per_parameter(student.params_dtype)),
                Term("trainer CUDA context, NCCL, allocator (allowance)",
                     int(TRAINER_RESERVE_GIB * GIB))]
    if config.loss.needs_reference:
        resident.append(Term("reference model (frozen shard)", student_shard * act))
    teacher_terms: list[Term] = []
    teacher = None
    if config.needs_teacher_model() and not config.uses_vllm_teacher():
        teacher = config.teacher.model_config()
        shard = shard_parameters(teacher, tp, pp) * DTYPE_BYTES[teacher.params_dtype]
        term = Term("teacher weights (frozen shard"
                    + (", offloaded while sampling)" if config.teacher.offload else ")"), shard)
        (teacher_terms if config.teacher.offload else resident).append(term)

    if spec.on_policy:
        tokens = config.data.max_prompt_tokens + config.sampling.max_new_tokens
    else:  # fixed sequences: answers have no budget; the model's window bounds them
        tokens = student.max_position_embeddings
    # sequences per forward/backward: the micro-batch, else a whole PPO mini-batch
    rows = config.micro_batch_size or (config.prompts_per_step // config.ppo_mini_batches
                                       * (config.sampling.n if spec.on_policy else 1))
    tokens_per_rank = -(-rows * tokens // cp)
    loss_tokens = min(rows * (config.sampling.max_new_tokens if spec.on_policy else tokens),
                      tokens_per_rank)

    engines_awake: list[Term] = []
    engines_training: list[Term] = []
    engine_budgets: list[Budget] = []
    share = int(rollout.gpu_memory_utilization * gpu_bytes)
    engine_dtype = DTYPE_BYTES[rollout.dtype if rollout.dtype != "auto" else student.params_dtype]
    for label, model, max_len, used, sleeps in (
            ("vLLM rollout engine", student, tokens, config.uses_vllm_rollouts(),
             rollout.sleep_level > 0),
            ("vLLM teacher engine", config.teacher.model_config() if config.teacher else None,
             config.teacher_max_model_len() if config.uses_vllm_teacher() else 0,
             config.uses_vllm_teacher(), False)):
        if not used:
            continue
        taken = Term(f"{label} (gpu_memory_utilization {rollout.gpu_memory_utilization})",
                     share)
        engines_awake.append(taken)
        engines_training.append(taken if not sleeps else Term(
            f"{label} asleep: CUDA graphs and context (allowance)", int(ENGINE_GRAPH_GIB * GIB)))
        engine_budgets.append(Budget(
            label, tuple(engine_terms(model, rollout.engine_tensor_parallel, engine_dtype,
                                      max_len, rollout.max_num_seqs, label)),
            share, "gpu_memory_utilization x GPU ="))

    rollout_phase = list(resident) + engines_awake
    if config.uses_vllm_rollouts():
        rollout_phase.append(Term("refit bucket + its TP shards (2 x refit_bucket_mb)",
                                  int(2 * rollout.refit_bucket_mb * 1e6)))
    elif spec.on_policy:
        rollout_rows = config.prompts_per_step * config.sampling.n
        rollout_phase.append(Term(
            f"embedded engine KV cache ({rollout_rows} x {tokens} tokens)",
            kv_cache_bytes(student, rollout_rows * tokens, tp, act, student.num_layers // pp)))

    training = list(resident) + teacher_terms + engines_training + [
        Term(f"student activations ({rows} x {tokens} tokens / CP {cp}"
             + (", sequence parallel" if parallel.sequence_parallel else "") + ")",
             activation_bytes(student, tokens_per_rank, tp, pp, parallel.sequence_parallel,
                              parallel.virtual_pipeline_stages)),
        Term("loss buffers (" + ("fused, chunked" if config.loss_impl == "fused"
                                 else "materialised logits") + ")",
             loss_bytes(student, tokens_per_rank, loss_tokens, tp,
                        config.loss_impl == "fused", config.loss_chunk_tokens,
                        teacher is not None))]
    if teacher is not None:
        training.append(Term("teacher forward working set (one layer)",
                             forward_working_set(teacher, tokens_per_rank, tp)))
    return MemoryPlan((Budget("rollout and refit", tuple(rollout_phase), gpu_bytes, "GPU"),
                       Budget("training", tuple(training), gpu_bytes, "GPU"),
                       *engine_budgets))


def check_memory(config: RunConfig, gpu_bytes: int) -> MemoryPlan:
    """:func:`plan_memory`, raising ValueError if any phase does not fit."""
    plan = plan_memory(config, gpu_bytes)
    plan.check()
    return plan
