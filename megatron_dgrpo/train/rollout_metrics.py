"""Per-step rollout metrics over the global batch: rewards, pass rates and response lengths,
overall and per task family.

Pure numerics over already-gathered per-rollout values (every DP rank's rollouts), so the
numbers do not depend on the data-parallel split. Keys:

=============================  =================================================================
``reward/mean``, ``/std``      reward over all rollouts (std: population, ``unbiased=False``)
``reward/pass_rate``           fraction of rollouts with reward >= :data:`PASS_REWARD`
``reward/<family>/mean|std``   the same within one task family
``pass_rate/<family>``         pass rate within one task family
``response/length_mean|max``   generated tokens per rollout
``response/truncated_frac``    fraction of rollouts cut at ``max_new_tokens`` (no stop token)
=============================  =================================================================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

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
