"""Pure loss numerics (torch only): advantages, KL estimators, policy terms, objectives.

No Megatron, no vLLM, no I/O, no process groups; :mod:`megatron_dgrpo.parallel` turns
(sharded, chunked) logits into the per-token terms these modules consume.
"""

from megatron_dgrpo.algorithms.advantages import (
    broadcast_to_tokens,
    group_advantages,
    shape_token_advantages,
)
from megatron_dgrpo.algorithms.aggregation import token_weights
from megatron_dgrpo.algorithms.inputs import StudentTerms, TokenBatch
from megatron_dgrpo.algorithms.metrics import LossMetrics
from megatron_dgrpo.algorithms.objectives import (
    OBJECTIVES,
    LossConfig,
    evaluate,
    get_objective,
)

__all__ = [
    "OBJECTIVES",
    "LossConfig",
    "LossMetrics",
    "StudentTerms",
    "TokenBatch",
    "broadcast_to_tokens",
    "evaluate",
    "get_objective",
    "group_advantages",
    "shape_token_advantages",
    "token_weights",
]
