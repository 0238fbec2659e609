"""The global L2 norm of the gradients a Megatron DDP model is about to step with.

Read after ``finalize_model_grads`` (gradients reduced over the data- and context-parallel
ranks) from each parameter's ``main_grad`` buffer, in float32 at least. Tensor-parallel
shards are summed over the TP group; parameters replicated on every TP rank (norms) are
counted once. Pipeline parallelism is not handled (the trainer runs PP = 1).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def global_grad_norm(model: torch.nn.Module, tp_group) -> float:
    """L2 norm (over the whole model) of the ``main_grad`` buffers of ``model``'s trainable
    parameters, identical on every rank."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    from megatron_dgrpo.parallel.cpu import collective_device

    squares = torch.zeros((), dtype=torch.float64, device=collective_device(tp_group))
    for param in model.parameters():
        grad = getattr(param, "main_grad", None)
        if param.requires_grad and grad is not None and param_is_not_tensor_parallel_duplicate(param):
            squares += grad.float().square().sum().to(squares)
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(squares, group=tp_group)
    return math.sqrt(float(squares))
