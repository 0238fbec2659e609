"""Measuring text length in tokens, and parsing length specs such as ``4k``.

Two counters share one interface, ``count(text) -> int`` (tokens):

* :class:`ApproxTokenCounter` (the default, no tokenizer needed). Its rule is documented and
  *additive over whitespace*: a run of letters of length L counts ``ceil(L / 5)`` tokens, every
  digit counts one token, every other non-space character (punctuation, symbols) counts one token,
  and whitespace is free. Joining pieces with whitespace therefore gives exactly the sum of their
  counts, which makes recorded needle depths exact under this counter. On English prose it lands
  within about 15% of Qwen-family BPE counts (Qwen splits digits one by one, as here).
* :class:`TokenizerCounter` wraps any object with ``encode(text) -> list[int]`` (an HF tokenizer
  via :func:`megatron_dgrpo.data.chat.load_chat_tokenizer`, or sentencepiece). BPE merges across
  piece boundaries make sums of piece counts approximate (typically within 1%).
"""

from __future__ import annotations

import math
import re
from typing import Protocol

_PIECE = re.compile(r"[^\W\d_]+|\d|[^\w\s]|_")
LETTERS_PER_TOKEN = 5


class TokenCounter(Protocol):
    """Anything that measures a text in tokens."""

    name: str

    def count(self, text: str) -> int:
        """Number of tokens in ``text``."""
        ...


class ApproxTokenCounter:
    """The documented, tokenizer-free approximation (see the module docstring)."""

    name = "approx"

    def count(self, text: str) -> int:
        total = 0
        for piece in _PIECE.findall(text):
            if piece[0].isalpha():
                total += -(-len(piece) // LETTERS_PER_TOKEN)
            else:
                total += 1
        return total


class TokenizerCounter:
    """Counts tokens with a real tokenizer: ``len(encoder.encode(text))``."""

    def __init__(self, encoder, name: str) -> None:
        self._encoder = encoder
        self.name = name

    def count(self, text: str) -> int:
        return len(self._encoder.encode(text))


def parse_length(spec: str) -> int:
    """Parse ``"4k"`` -> 4096, ``"1m"`` -> 1048576, ``"3000"`` -> 3000 (tokens).

    ``k`` and ``m`` are binary multiples, as in RULER's 4K/8K/.../128K buckets.
    """
    text = spec.strip().lower()
    multiplier = 1
    if text.endswith("k"):
        multiplier, text = 1024, text[:-1]
    elif text.endswith("m"):
        multiplier, text = 1024 * 1024, text[:-1]
    if not text.isdigit() or int(text) <= 0:
        raise ValueError(f"length {spec!r} is not a positive integer with an optional k/m suffix")
    return int(text) * multiplier


def format_length(tokens: int) -> str:
    """Inverse of :func:`parse_length` for bucket labels: 4096 -> ``"4k"``, 3000 -> ``"3000"``."""
    if tokens % (1024 * 1024) == 0:
        return f"{tokens // (1024 * 1024)}m"
    if tokens % 1024 == 0:
        return f"{tokens // 1024}k"
    return str(tokens)


def nearest_bucket(num_tokens: int) -> str:
    """The power of two nearest ``num_tokens`` on a log scale, as a label: 1100 -> ``"1k"``,
    1400 -> ``"1k"``, 1500 -> ``"2k"`` (RULER-style buckets for measured lengths)."""
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    return format_length(1 << math.floor(math.log2(num_tokens) + 0.5))
