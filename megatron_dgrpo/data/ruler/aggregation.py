"""Aggregation tasks: common words extraction (``cwe``) and frequent words extraction (``fwe``).

**cwe** (RULER's rules): a numbered list ``1. w 2. w ...`` of distinct words, shuffled, in which
``num_common`` words appear ``freq_common`` times and every other word ``freq_uncommon`` times;
the references are the common words. Below 4096 target tokens the counts are 6 and 1. One worked
example (40 words, counts 10 and 3; below 4096 tokens 20 words, counts 3 and 1) precedes the task.
Words come from :func:`.vocab.vocabulary`; the example's words are never used by the task.

**fwe** (RULER's rules): a vocabulary of ``(target - tokens_to_generate) // 50`` distinct random
6-letter lower-case coded words in random order; the first is replaced by ``...`` (noise). For a
text of ``N`` words the word of rank ``k`` appears ``floor(N k^-alpha / zeta(alpha))`` times, all
occurrences shuffled; the references are the words of ranks 2, 3 and 4. ``N`` is at least the
smallest count for which ranks 2 to 5 have strictly decreasing counts (so the answer is unique).
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass

from .spec import Rendered, TaskContext
from .vocab import vocabulary

CWE_PREAMBLE = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.")
FWE_PREAMBLE = ("Read the following coded text and track the frequency of each coded word. Find the three "
                "most frequently appeared coded words.")
FWE_QUESTION = ("Question: Do not provide any explanation. Please ignore the dots '....'. What are the three "
                "most frequently appeared words in the above coded text?")
SHORT_CONTEXT = 4096  # below this target length cwe uses smaller counts (RULER's rule)
_MIN_CWE_VOCABULARY = 10_000


def numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def word_list(rng: random.Random, words: list[str], num_common: int, freq_common: int,
              freq_uncommon: int) -> str:
    """The shuffled numbered list: ``words[:num_common]`` ``freq_common`` times, the rest ``freq_uncommon``."""
    entries = words[:num_common] * freq_common + words[num_common:] * freq_uncommon
    rng.shuffle(entries)
    return numbered(entries)


@dataclass(frozen=True)
class CommonWordsTask:
    name: str = "cwe"
    freq_common: int = 30
    freq_uncommon: int = 3
    num_common: int = 10
    tokens_to_generate: int = 120

    def __post_init__(self) -> None:
        if not self.freq_common > self.freq_uncommon >= 1 or self.num_common < 1:
            raise ValueError(f"{self.name}: need freq_common > freq_uncommon >= 1 and num_common >= 1")

    def question(self) -> str:
        return f"Question: What are the {self.num_common} most common words in the above list?"

    def instance(self, context: TaskContext) -> "CommonWordsInstance":
        return CommonWordsInstance(self, context)


class CommonWordsInstance:
    def __init__(self, task: CommonWordsTask, context: TaskContext) -> None:
        self.task, self.seed = task, context.seed
        short = context.target_tokens < SHORT_CONTEXT
        shot_words, shot_common, shot_uncommon = (20, 3, 1) if short else (40, 10, 3)
        self.freq_common, self.freq_uncommon = (6, 1) if short else (task.freq_common, task.freq_uncommon)
        self.min_units = task.num_common
        shot = context.rng.sample(vocabulary(_MIN_CWE_VOCABULARY), shot_words)
        self.excluded = set(shot)
        self.example = (f"{CWE_PREAMBLE}\n{word_list(context.rng, shot, task.num_common, shot_common, shot_uncommon)}"
                        f"\n{task.question()} Answer: The top {task.num_common} words that appear most "
                        f"often in the list are: {numbered(shot[:task.num_common])}")
        self._entry_tokens = context.counter.count(numbered(["placeholder"] * 100)) / 100

    def tokens_per_unit(self) -> float:
        return self.freq_uncommon * self._entry_tokens

    def render(self, n: int) -> Rendered:
        rng = random.Random(f"cwe:{self.seed}:{n}")
        pool = [w for w in vocabulary(max(_MIN_CWE_VOCABULARY, n + len(self.excluded))) if w not in self.excluded]
        words = rng.sample(pool, n)
        task = self.task
        listing = word_list(rng, words, task.num_common, self.freq_common, self.freq_uncommon)
        return Rendered(document=f"{self.example}\n\n{CWE_PREAMBLE}\n{listing}", question=task.question(),
                        references=tuple(words[:task.num_common]))


def zeta(alpha: float) -> float:
    """Riemann zeta(alpha) for alpha > 1: 1000 terms plus the Euler-Maclaurin tail (error < 1e-12)."""
    if alpha <= 1:
        raise ValueError(f"zeta needs alpha > 1, got {alpha}")
    terms = 1000
    head = math.fsum(k ** -alpha for k in range(1, terms))
    n = float(terms)
    tail = n ** (1 - alpha) / (alpha - 1) + 0.5 * n ** -alpha + alpha * n ** (-alpha - 1) / 12
    return head + tail


def zipf_counts(num_words: int, vocabulary_size: int, alpha: float) -> list[int]:
    """``floor(N k^-alpha / zeta(alpha))`` for ranks k = 1..vocabulary_size."""
    scale = num_words / zeta(alpha)
    return [int(scale * k ** -alpha) for k in range(1, vocabulary_size + 1)]


@dataclass(frozen=True)
class FrequentWordsTask:
    name: str = "fwe"
    alpha: float = 2.0
    word_length: int = 6
    tokens_to_generate: int = 50

    def __post_init__(self) -> None:
        if self.alpha <= 1 or self.word_length < 2:
            raise ValueError(f"{self.name}: need alpha > 1 and word_length >= 2")

    def instance(self, context: TaskContext) -> "FrequentWordsInstance":
        return FrequentWordsInstance(self, context)


class FrequentWordsInstance:
    def __init__(self, task: FrequentWordsTask, context: TaskContext) -> None:
        self.task, self.seed = task, context.seed
        size = max(5, (context.target_tokens - task.tokens_to_generate) // 50)
        coded: set[str] = set()
        while len(coded) < size:
            coded.add("".join(context.rng.choices(string.ascii_lowercase, k=task.word_length)))
        self.vocabulary = sorted(coded)
        context.rng.shuffle(self.vocabulary)
        self.vocabulary[0] = "..."
        self.min_units = next(n for n in range(1, 10**6) if self._unique_answer(n))
        sample = self.vocabulary[1:101]
        self._word_tokens = context.counter.count(" ".join(sample)) / len(sample)

    def _unique_answer(self, n: int) -> bool:
        counts = zipf_counts(n, 5, self.task.alpha)
        return counts[1] > counts[2] > counts[3] > counts[4]

    def tokens_per_unit(self) -> float:
        return self._word_tokens

    def render(self, n: int) -> Rendered:
        counts = zipf_counts(n, len(self.vocabulary), self.task.alpha)
        words = [w for w, c in zip(self.vocabulary, counts) for _ in range(c)]
        random.Random(f"fwe:{self.seed}:{n}").shuffle(words)
        return Rendered(document=f"{FWE_PREAMBLE} {' '.join(words)}", question=FWE_QUESTION,
                        references=tuple(self.vocabulary[1:4]))
