"""Next-token sampling: temperature, top-k, top-p; pure torch, no model, no engine.

Shapes: ``logits`` is [B, V] (float), returned tokens and log-probs are [B].
"""

from __future__ import annotations

import torch


def scaled_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` in float32 ([B, V]); temperature 0 means 1."""
    scale = temperature if temperature > 0 else 1.0
    return torch.log_softmax(logits.float() / scale, dim=-1)


def restrict(logprobs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to ``-inf`` the log-probs of tokens outside the top-k and the top-p nucleus.

    ``top_k == 0`` and ``top_p == 1`` disable the respective filter. Top-k applies first and
    the nucleus is taken over the renormalised top-k distribution (as vLLM does). The most
    likely token is always kept. Input and output are [B, V] log-probabilities (the output unnormalised).
    """
    restricted = logprobs
    vocab = logprobs.shape[-1]
    if 0 < top_k < vocab:
        kth_best = torch.topk(logprobs, top_k, dim=-1).values[:, -1:]
        restricted = restricted.masked_fill(restricted < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_lp, order = torch.sort(restricted, dim=-1, descending=True)
        probs = torch.softmax(sorted_lp, dim=-1)  # nucleus of the top-k-renormalised distribution
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        restricted = restricted.masked_fill(drop, float("-inf"))
    return restricted


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row. Returns (tokens [B] int64, log-probs [B] float32).

    Log-probs follow the engine convention: the sampled token's log-probability under the
    temperature-scaled, untruncated distribution. ``temperature == 0`` is greedy (argmax).
    """
    logprobs = scaled_logprobs(logits, temperature)
    if temperature == 0:
        tokens = logprobs.argmax(dim=-1)
    else:
        allowed = restrict(logprobs, top_k, top_p)
        probs = torch.softmax(allowed, dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
