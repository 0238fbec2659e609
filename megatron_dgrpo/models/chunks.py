"""Virtual pipeline stages: a rank's model chunks and the pipeline stages they hold.

With ``parallel.virtual_pipeline_stages = VP > 1`` the layers are cut into ``S = PP x VP``
contiguous stages (each ``num_layers / S`` layers); pipeline rank ``p`` holds stages
``p, p + PP, ..., p + (VP - 1) PP``, one ``GPTModel`` chunk each (Megatron's ``vp_stage``
``v`` is stage ``v x PP + p``). Stage 0 has the embeddings, stage ``S - 1`` the final norm
and the output layer. At VP = 1 a rank holds one ``GPTModel``, its stage ``p`` of ``PP``.

Checkpoints, the refit stream and the fingerprint check address parameters by *stage*
(``models/mapping.py``'s tables take a stage index and a stage count), so an interleaved
rank is described exactly like ``VP`` contiguous ranks of a ``PP x VP`` pipeline:

    for chunk, stage in live_stages(model):      # (unwrapped GPTModel, its stage index)
        mapping.live_parameters(chunk, config, stage, pipeline_stages())

:class:`VirtualStages` keeps the chunks as one module (``state_dict``, ``.to``,
``requires_grad_``, ``parameters`` work over all of them); :func:`model_chunks` lists the
chunks of that, of a plain model, or of a list of (DDP-wrapped) chunks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class VirtualStages(torch.nn.Module):
    """This rank's model chunks (``GPTModel`` each), in stage order: ``chunks[v]`` is
    pipeline stage ``v x PP + pp_rank``."""

    def __init__(self, chunks: Sequence[torch.nn.Module]):
        super().__init__()
        if len(chunks) < 2:
            raise ValueError("VirtualStages holds two or more chunks; use the GPTModel itself")
        self.chunks = torch.nn.ModuleList(chunks)

    @property
    def config(self):
        """The chunks' (shared) Megatron ``TransformerConfig``."""
        return self.chunks[0].config

    def forward(self, *args, **kwargs):
        raise TypeError("a rank's virtual stages do not run as one module: run them through "
                        "megatron_dgrpo.models.forward.run_micro_batches")


def model_chunks(model: torch.nn.Module | Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
    """The chunks, in stage order, of a :class:`VirtualStages`, of a list of (possibly
    DDP-wrapped) chunks, or ``[model]`` for one stage's model."""
    if isinstance(model, VirtualStages):
        return list(model.chunks)
    if isinstance(model, (list, tuple)):
        return list(model)
    return [model]


def pipeline_stages() -> int:
    """``S = PP x VP``: the number of contiguous stages of this process's layout."""
    from megatron.core import parallel_state as ps

    return (ps.get_pipeline_model_parallel_world_size()
            * (ps.get_virtual_pipeline_model_parallel_world_size() or 1))


def live_stages(model: torch.nn.Module | Sequence[torch.nn.Module]
                ) -> list[tuple[torch.nn.Module, int]]:
    """``(unwrapped GPTModel, stage index)`` of each chunk this rank holds (ValueError if the
    chunk count is not the layout's virtual stage count)."""
    from megatron.core import parallel_state as ps

    from megatron_dgrpo.models.forward import unwrap

    chunks = model_chunks(model)
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    virtual = ps.get_virtual_pipeline_model_parallel_world_size() or 1
    if len(chunks) != virtual:
        raise ValueError(f"the model has {len(chunks)} chunk(s), the layout {virtual} virtual "
                         "pipeline stage(s) per rank")
    return [(unwrap(chunk), v * pp + pp_rank) for v, chunk in enumerate(chunks)]


def stage_owner(stage: int, pipeline_parallel: int) -> int:
    """The pipeline rank holding ``stage``."""
    return stage % pipeline_parallel
