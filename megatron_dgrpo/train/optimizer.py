"""The student's optimizer step: Megatron DDP + Megatron's Adam, the learning-rate schedule,
and the global gradient norm.

    student_optimizer = StudentOptimizer(model, config.optim)
    student_optimizer.zero_grad()
    ... backward through student_optimizer.ddp ...
    metrics = student_optimizer.step(step, total_steps)   # optim/lr, optim/grad_norm

The gradient norm is read after ``finalize_model_grads`` (gradients reduced over the data-
and context-parallel ranks) from each parameter's ``main_grad`` buffer, in float32 at least,
before any clipping. Tensor-parallel shards are summed over the TP group and pipeline
stages over the PP group; parameters replicated on every TP rank (norms) are counted once,
and so are tied embeddings at PP > 1 (the last stage's copy of the embedding table, marked
``shared`` by Megatron, holds the same all-reduced gradient as the first stage's).
"""

from __future__ import annotations

import math

import torch

from megatron_dgrpo.parallel.collectives import all_reduce, collective_device


def global_grad_norm(model: torch.nn.Module, tp_group, pp_group=None) -> float:
    """L2 norm (over the whole model: every TP shard and pipeline stage) of the
    ``main_grad`` buffers of ``model``'s trainable parameters, identical on every rank."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    squares = torch.zeros((), dtype=torch.float64, device=collective_device(tp_group))
    for param in model.parameters():
        grad = getattr(param, "main_grad", None)
        if (param.requires_grad and grad is not None and param_is_not_shared(param)
                and param_is_not_tensor_parallel_duplicate(param)):
            squares += grad.float().square().sum().to(squares)
    return math.sqrt(float(all_reduce(all_reduce(squares, "sum", tp_group), "sum", pp_group)))


class StudentOptimizer:
    """Megatron DDP around the student and Megatron's (non-distributed) Adam over it.

    Args:
        model: the student ``GPTModel`` (this rank's shard).
        optim: the run's ``optim`` section (:class:`megatron_dgrpo.train.config.OptimConfig`).

    Attributes:
        ddp: the DDP-wrapped student: run the training forward through it so gradients land
            in its ``main_grad`` buffers.
        optimizer: Megatron's optimizer (its ``state_dict`` goes into checkpoints).
    """

    def __init__(self, model: torch.nn.Module, optim):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.optim = optim
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.ddp = DistributedDataParallel(config=model.config, module=model,
                                           ddp_config=DistributedDataParallelConfig())
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=optim.lr, weight_decay=optim.weight_decay,
                            adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2,
                            clip_grad=optim.clip_grad, params_dtype=model.config.params_dtype),
            [self.ddp])

    def zero_grad(self) -> None:
        """Clear DDP's gradient buffers and the optimizer's gradients."""
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self, step: int, total_steps: int, loss: float = 0.0) -> dict[str, float]:
        """Reduce the accumulated gradients, set the schedule's learning rate for 1-based
        ``step`` and update the weights; returns ``optim/lr``, ``optim/grad_norm`` and
        ``optim/skipped``. ``loss``: the global loss these gradients are of. If it or the
        gradient norm is not finite (both are the same on every rank), nothing is updated
        (weights, Adam's moments and step count stay) and ``optim/skipped`` is 1."""
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads([self.ddp])
        grad_norm = global_grad_norm(self.ddp, self.tp_group, self.pp_group)  # before clipping
        lr = self.optim.lr_at(step, total_steps)
        if not (math.isfinite(grad_norm) and math.isfinite(loss)):
            self.zero_grad()
            return {"optim/lr": lr, "optim/grad_norm": grad_norm, "optim/skipped": 1.0}
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return {"optim/lr": lr, "optim/grad_norm": grad_norm, "optim/skipped": 0.0}
