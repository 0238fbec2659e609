"""The rollout-engine interface and the records that cross it.

An engine turns tokenised prompts into ``n`` sampled completions each, and reports, for
every sampled token, the log-probability the engine itself assigned to it. The trainer
recomputes that log-probability with its own weights; the gap between the two is what the
truncated importance-sampling correction of the loss accounts for.

Log-probability convention (all engines): the log-probability of the sampled token under
the temperature-scaled, *untruncated* distribution ``log_softmax(logits / temperature)``
(``temperature == 0`` means greedy and reports ``log_softmax(logits)``). Top-k / top-p only
restrict which tokens may be drawn. The trainer scores with the same convention.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol, Sequence


@dataclass
class SamplingConfig:
    """How to sample (a run config's ``sampling`` section). ``n`` completions per prompt (the
    group size G of GRPO). The seed of each engine call is not configured here: the trainer
    derives it from the run's ``seed``, the step and the replica (:meth:`params`)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k restriction
    max_new_tokens: int = 64
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)

    def params(self, seed: int, prompt_offset: int = 0) -> SamplingParams:
        """These settings for one engine call seeded with ``seed`` (``prompt_offset``: see
        :class:`SamplingParams`)."""
        return SamplingParams(**{**asdict(self), "seed": seed, "prompt_offset": prompt_offset})

    def validate(self) -> None:
        if self.n < 1:
            raise ValueError(f"sampling.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class SamplingParams(SamplingConfig):
    """:class:`SamplingConfig` plus the seed of one ``generate`` call. ``prompt_offset``: the
    position of this call's first prompt in a larger batch that is sampled in several calls
    (one per data-parallel replica): engines that seed each prompt (vLLM: ``seed`` and the
    prompt's position) then draw the same samples whatever the split."""

    seed: int = 0
    prompt_offset: int = 0


@dataclass
class Rollout:
    """One sampled completion.

    ``logprobs[i]`` is the engine's log-probability (nats) of ``response_ids[i]``.
    ``finish_reason`` is ``"stop"`` (a stop token or stop string ended it; the stop token is
    kept as the last response token) or ``"length"`` (``max_new_tokens`` reached).
    """

    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str | None = None


@dataclass
class RolloutBatch:
    """All completions of one ``generate`` call, grouped by prompt: rollouts
    ``[i * n, (i + 1) * n)`` belong to prompt ``i``."""

    rollouts: list[Rollout]
    seconds: float

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(r.response_ids) for r in self.rollouts)

    def problem(self, num_prompts: int, n: int) -> str | None:
        """What is wrong with this batch as the answer to ``num_prompts`` prompts x ``n``
        samples (missing or extra samples, rows out of prompt order), or ``None``."""
        got = [r.prompt_index for r in self.rollouts]
        expected = [i for i in range(num_prompts) for _ in range(n)]
        if got == expected:
            return None
        counts = {i: got.count(i) for i in range(num_prompts) if got.count(i) != n}
        detail = ", ".join(f"prompt {i}: {c} of {n}" for i, c in counts.items()) or \
            "out of prompt order"
        return (f"the engine returned {len(got)} samples for {num_prompts} prompts x {n} "
                f"({detail})")

    @property
    def tokens_per_second(self) -> float:
        return self.num_generated_tokens / self.seconds if self.seconds > 0 else 0.0


class RolloutEngine(Protocol):
    """What the trainer needs from an engine (embedded Megatron, vLLM)."""

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        """Sample ``params.n`` completions for each tokenised prompt."""
        ...
