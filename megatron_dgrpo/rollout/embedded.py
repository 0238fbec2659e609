"""The embedded engine: batched sampling straight from the trainer's Megatron model.

It needs no second copy of the weights and no weight sync, so it is the default where
vLLM is absent and the reference the vLLM engine is checked against. It uses Megatron's
static KV cache (``StaticInferenceContext``) in one of two batchings:

* ``padded`` (where the core attention applies explicit masks in every mode: the local
  spec's :class:`~megatron_dgrpo.models.sdpa_attention.SDPACoreAttention`): all rows in one
  batch, prompts left-padded to the longest, a padding mask on every forward; prefill in
  chunks, then one token per step. RoPE scores depend only on position differences, so a
  row's left shift does not change its logits.
* ``buckets`` (any attention, e.g. Transformer Engine's, which ignores masks once Megatron
  switches to decoding): rows grouped by prompt length (:func:`length_buckets`), no padding;
  within a bucket, until a row's prompt is exhausted its next input is its own prompt token
  (teacher forcing), so every row sees exactly its causal prefix.

Runs on every rank of a tensor-parallel group (all ranks call ``generate`` with the same
arguments); the sampled tokens are broadcast from the group's first rank so the ranks
never diverge. Pipeline parallelism is not supported here (PP=1).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from megatron_dgrpo.parallel.collectives import broadcast_tensor
from megatron_dgrpo.parallel.vocab import drop_padded_vocab
from megatron_dgrpo.rollout.engine import Rollout, RolloutBatch, SamplingParams
from megatron_dgrpo.rollout.sampling import sample_next

BATCHINGS = ("auto", "padded", "buckets")
# Padded prefill: at most this many [query, key] mask entries per forward (bounds the mask
# and SDPA's score memory on long prompts; short prompts prefill in one forward).
PREFILL_MASK_ELEMENTS = 2**26


class EmbeddedEngine:
    """Sample from a live Megatron ``GPTModel`` (PP=1, any TP).

    Args:
        model: the (unwrapped) GPTModel; its training mode is restored after ``generate``.
        vocab_size: the tokenizer's vocabulary size; logits of the padding rows Megatron adds
            to the output layer (up to the padded size) are never sampled.
        decode: token ids -> text; needed for ``stop_strings`` and to fill ``Rollout.text``.
        batching: ``padded``, ``buckets`` (see the module docstring) or ``auto``: padded when
            the model's core attention honours explicit masks, buckets otherwise.
    """

    def __init__(self, model: torch.nn.Module, vocab_size: int,
                 decode: Callable[[list[int]], str] | None = None, batching: str = "auto"):
        from megatron.core import parallel_state

        if parallel_state.get_pipeline_model_parallel_world_size() != 1:
            raise ValueError("the embedded engine needs pipeline_parallel=1; "
                             "use the vLLM engine with pipeline-parallel trainers")
        if batching not in BATCHINGS:
            raise ValueError(f"batching must be one of {BATCHINGS}, got {batching!r}")
        masks_honoured = _attention_honours_masks(model)
        if batching == "padded" and not masks_honoured:
            raise ValueError("batching='padded' needs a core attention that applies explicit "
                             "masks when decoding (the local spec's); this model's does not")
        self.padded = batching == "padded" or (batching == "auto" and masks_honoured)
        self.model = model
        self.vocab_size = vocab_size
        self.decode = decode
        self._tp_group = parallel_state.get_tensor_model_parallel_group()
        self._tp_src = parallel_state.get_tensor_model_parallel_src_rank()
        self._tp_size = parallel_state.get_tensor_model_parallel_world_size()

    def _logits(self, tokens: torch.Tensor, first_position: int, context,
                masked: torch.Tensor | None = None) -> torch.Tensor:
        """Last-position logits [B, V] (float32, unpadded vocabulary) for ``tokens`` [B, S];
        ``masked`` [B, 1, S, first_position + S]: True where a query must not see a key."""
        positions = torch.arange(first_position, first_position + tokens.shape[1],
                                 device=tokens.device)
        positions = positions.unsqueeze(0).expand(tokens.shape[0], -1)
        output = self.model(tokens, positions, masked, inference_context=context,
                            runtime_gather_output=True)
        context.sequence_len_offset += tokens.shape[1]
        return drop_padded_vocab(output[:, -1], self.vocab_size).float()

    def _same_on_all_tp_ranks(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._tp_size > 1:
            broadcast_tensor(tokens, self._tp_src, self._tp_group)
        return tokens

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        """Sample ``params.n`` completions per prompt; see :class:`RolloutEngine`.

        Rows are decoded as one left-padded batch, or in buckets of similar prompt length
        (:func:`length_buckets`); see the module docstring.
        """
        params.validate()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, and no prompt may be empty")
        if params.stop_strings and self.decode is None:
            raise ValueError("stop_strings need a decode function (EmbeddedEngine(decode=...))")

        start = time.perf_counter()
        device = next(self.model.parameters()).device
        rows = [list(p) for p in prompts for _ in range(params.n)]
        responses: list[list[int]] = [[] for _ in rows]
        logprobs: list[list[float]] = [[] for _ in rows]
        finish: list[str | None] = [None] * len(rows)
        generator = torch.Generator(device=device).manual_seed(params.seed)

        was_training = self.model.training
        self.model.eval()
        try:
            if self.padded:
                self._decode_padded(rows, params, generator, responses, logprobs, finish)
            else:
                for bucket in length_buckets([len(r) for r in rows], params.max_new_tokens):
                    self._decode_rows(bucket, rows, params, generator, responses, logprobs,
                                      finish)
        finally:
            self.model.train(was_training)

        rollouts = [
            Rollout(prompt_index=i // params.n, prompt_ids=rows[i], response_ids=responses[i],
                    logprobs=logprobs[i], finish_reason=finish[i] or "length",
                    text=self.decode(responses[i]) if self.decode else None)
            for i in range(len(rows))
        ]
        return RolloutBatch(rollouts=rollouts, seconds=time.perf_counter() - start)

    def _decode_padded(self, rows: list[list[int]], params: SamplingParams,
                       generator: torch.Generator, responses, logprobs, finish) -> None:
        """Decode every row in one batch, prompts left-padded to the longest; writes into
        responses/logprobs/finish. Padding keys are masked for every query (a padding query
        sees only itself, so no softmax row is empty). Rows come in groups of ``params.n``
        copies of one prompt: each prompt is prefilled once and its KV cache copied to its
        group."""
        from megatron.core.inference.contexts import StaticInferenceContext

        copies = params.n
        device = next(self.model.parameters()).device
        longest = max(len(r) for r in rows)
        total = longest + params.max_new_tokens
        tokens = torch.zeros(len(rows), total, dtype=torch.long)
        for slot, row in enumerate(rows):
            tokens[slot, longest - len(row):longest] = torch.tensor(row)
        tokens = tokens.to(device)
        pads = torch.tensor([longest - len(r) for r in rows], device=device)
        key_is_pad = torch.arange(total, device=device)[None, :] < pads[:, None]  # [B, total]
        context = StaticInferenceContext(len(rows), total)
        prompts, prompt_is_pad = tokens[::copies], key_is_pad[::copies]
        chunk = max(1, PREFILL_MASK_ELEMENTS // (len(prompts) * total))
        for start in range(0, longest, chunk):
            end = min(start + chunk, longest)
            queries = torch.arange(start, end, device=device)[:, None]
            keys = torch.arange(end, device=device)[None, :]
            masked = ((prompt_is_pad[:, None, None, :end] | (keys > queries)) & (keys != queries))
            logits = self._logits(prompts[:, start:end], start, context, masked)
        logits = logits.repeat_interleave(copies, dim=0)
        _copy_cache_to_groups(context, len(prompts), copies)
        context.enable_decode_mode()
        stop_ids = set(params.stop_token_ids)
        for position in range(longest, total):
            sampled, sampled_logprobs = sample_next(
                logits, params.temperature, params.top_k, params.top_p, generator)
            sampled = self._same_on_all_tp_ranks(sampled)
            for row in range(len(rows)):
                if finish[row] is None:
                    finish[row] = self._append(row, int(sampled[row]),
                                               float(sampled_logprobs[row]), responses,
                                               logprobs, params, stop_ids)
            if all(reason is not None for reason in finish) or position + 1 == total:
                break
            tokens[:, position] = sampled
            logits = self._logits(tokens[:, position:position + 1], position, context,
                                  key_is_pad[:, None, None, :position + 1])

    def _decode_rows(self, indices: list[int], rows: list[list[int]], params: SamplingParams,
                     generator: torch.Generator, responses, logprobs, finish) -> None:
        """Decode the rows ``indices`` as one batch, writing into responses/logprobs/finish.

        One prefill over the bucket's common prompt prefix, then one token per step; until a
        row's prompt is exhausted its next input is its own prompt token.
        """
        from megatron.core.inference.contexts import StaticInferenceContext

        device = next(self.model.parameters()).device
        prompt_lengths = torch.tensor([len(rows[i]) for i in indices], device=device)
        total = int(prompt_lengths.max()) + params.max_new_tokens
        tokens = torch.zeros(len(indices), total, dtype=torch.long)
        for slot, i in enumerate(indices):
            tokens[slot, :len(rows[i])] = torch.tensor(rows[i])
        tokens = tokens.to(device)
        stop_ids = set(params.stop_token_ids)
        context = StaticInferenceContext(len(indices), total)
        common = int(prompt_lengths.min())
        logits = self._logits(tokens[:, :common], 0, context)
        context.enable_decode_mode()
        for position in range(common, total):
            sampled, sampled_logprobs = sample_next(
                logits, params.temperature, params.top_k, params.top_p, generator)
            sampled = self._same_on_all_tp_ranks(sampled)
            in_prompt = position < prompt_lengths
            tokens[:, position] = torch.where(in_prompt, tokens[:, position], sampled)
            for slot in torch.nonzero(~in_prompt).flatten().tolist():
                i = indices[slot]
                if finish[i] is None:
                    finish[i] = self._append(i, int(sampled[slot]), float(sampled_logprobs[slot]),
                                             responses, logprobs, params, stop_ids)
            if all(finish[i] is not None for i in indices) or position + 1 == total:
                break
            logits = self._logits(tokens[:, position:position + 1], position, context)

    def _append(self, row: int, token: int, logprob: float, responses, logprobs,
                params: SamplingParams, stop_ids: set[int]) -> str | None:
        """Record one sampled token; return the finish reason if the row is now done."""
        responses[row].append(token)
        logprobs[row].append(logprob)
        if token in stop_ids:
            return "stop"
        if params.stop_strings:
            text = self.decode(responses[row])
            if any(s in text for s in params.stop_strings):
                return "stop"
        if len(responses[row]) >= params.max_new_tokens:
            return "length"
        return None


def _copy_cache_to_groups(context, prompts: int, copies: int) -> None:
    """Spread the KV cache of ``prompts`` prefilled rows (batch slots ``0 .. prompts - 1``)
    to ``prompts * copies`` slots, row ``i`` to slots ``i * copies .. i * copies + copies - 1``
    (Megatron's static cache: one ``(keys, values)`` pair per layer, ``[S, B, groups, d]``)."""
    index = torch.arange(prompts).repeat_interleave(copies)
    for memories in context.key_value_memory_dict.values():
        for memory in memories:
            memory[:, :len(index)] = memory[:, index.to(memory.device)]


def _attention_honours_masks(model: torch.nn.Module) -> bool:
    """True when every core attention of ``model`` applies an explicit ``attention_mask`` in
    prefill and decode (Megatron's local ``DotProductAttention`` and our SDPA one)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_dgrpo.models.sdpa_attention import SDPACoreAttention

    cores = [m.core_attention for m in model.modules() if hasattr(m, "core_attention")]
    return bool(cores) and all(isinstance(c, (SDPACoreAttention, DotProductAttention))
                               for c in cores)


def length_buckets(prompt_lengths: Sequence[int], max_new_tokens: int) -> list[list[int]]:
    """Partition row indices into buckets of consecutive prompt lengths that minimise the
    number of forward passes, ``sum over buckets of (longest - shortest + max_new_tokens)``
    (a bucket feeds its longer prompts token by token from its shortest length, then decodes).
    Exact dynamic programme over the sorted distinct lengths; buckets come out shortest first.
    """
    lengths = sorted(set(prompt_lengths))
    best = [0] + [None] * len(lengths)  # best[j]: cost of bucketing lengths[:j]
    cut = [0] * (len(lengths) + 1)
    for j in range(1, len(lengths) + 1):
        for i in range(j):
            cost = best[i] + lengths[j - 1] - lengths[i] + max_new_tokens
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    spans, j = [], len(lengths)
    while j > 0:
        spans.append((lengths[cut[j]], lengths[j - 1]))
        j = cut[j]
    return [[row for row, length in enumerate(prompt_lengths) if low <= length <= high]
            for low, high in reversed(spans)]
