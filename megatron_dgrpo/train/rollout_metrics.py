"""Per-step rollout metrics over the global batch: rewards, pass rates and response lengths,
overall and per task family.

:func:`step_rollout_metrics` gathers every DP rank's rollouts of a step, then
:func:`rollout_metrics` computes over them (pure numerics), so the numbers do not depend on
the data-parallel split. Keys:

=============================  =================================================================
``reward/mean``, ``/std``      reward over all rollouts (std: population, ``unbiased=False``)
``reward/pass_rate``           fraction of rollouts with reward >= :data:`PASS_REWARD`
``reward/<family>/mean|std``   the same within one task family
``pass_rate/<family>``         pass rate within one task family
``response/length_mean|max``   generated tokens per rollout
``response/truncated_frac``    fraction of rollouts cut at ``max_new_tokens`` (no stop token)
``throughput/rollout_tokens``  generated tokens over the slowest DP rank's generation time
``_per_s``
=============================  =================================================================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_dgrpo.parallel.collectives import all_gather_objects, all_gather_tensors, reduce_scalar

PASS_REWARD = 1.0  # a rollout "passes" when its reward reaches the full score


def family_of(metadata: dict, source: str) -> str:
    """The task family of an example: the generator's ``task_family`` for synthetic tasks,
    ``longblocks:<source>`` for public LongBlocks rows (as in ``dgrpo eval``)."""
    return metadata.get("task_family") or f"longblocks:{source}"


def _stats(prefix: str, rewards: torch.Tensor) -> dict[str, float]:
    return {f"{prefix}/mean": rewards.mean().item(),
            f"{prefix}/std": rewards.std(unbiased=False).item()}


def rollout_metrics(rewards: Sequence[float], families: Sequence[str],
                    lengths: Sequence[int], truncated: Sequence[bool]) -> dict[str, float]:
    """Metrics of one step's rollouts; the four sequences run over the same rollouts."""
    if not (len(rewards) == len(families) == len(lengths) == len(truncated)) or not rewards:
        raise ValueError(f"need the same non-zero number of rewards ({len(rewards)}), families "
                         f"({len(families)}), lengths ({len(lengths)}) and truncation flags "
                         f"({len(truncated)})")
    rewards = torch.tensor(list(rewards), dtype=torch.float64)
    passed = (rewards >= PASS_REWARD).double()
    lengths = torch.tensor(list(lengths), dtype=torch.float64)
    metrics = _stats("reward", rewards)
    metrics["reward/pass_rate"] = passed.mean().item()
    for family in sorted(set(families)):
        chosen = torch.tensor([f == family for f in families])
        metrics.update(_stats(f"reward/{family}", rewards[chosen]))
        metrics[f"pass_rate/{family}"] = passed[chosen].mean().item()
    metrics["response/length_mean"] = lengths.mean().item()
    metrics["response/length_max"] = lengths.max().item()
    metrics["response/truncated_frac"] = sum(map(bool, truncated)) / len(truncated)
    return metrics


def step_rollout_metrics(batch, dp_group) -> dict[str, float]:
    """:func:`rollout_metrics` of a :class:`~megatron_dgrpo.train.batch.StepBatch` (with
    rewards) over every rank of ``dp_group``, plus the global rollout throughput (DP ranks
    generate concurrently: all tokens over the slowest rank's time)."""
    def gathered(values: list) -> list:
        return [v for part in all_gather_objects(values, dp_group) for v in part]

    rewards = torch.cat(all_gather_tensors(batch.rewards, dp_group)).tolist()
    lengths = gathered(batch.response_lengths)
    metrics = rollout_metrics(rewards, gathered([family_of(e.metadata, e.source)
                                                 for e in batch.examples]),
                              lengths, gathered(batch.truncated))
    slowest = reduce_scalar(batch.generation_seconds, "max", dp_group)
    metrics["throughput/rollout_tokens_per_s"] = sum(lengths) / max(slowest, 1e-9)
    return metrics
