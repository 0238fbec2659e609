"""Megatron-core on machines without CUDA.

Megatron-core 0.16 runs its local (plain torch) layers on CPU over gloo, except for three
places that assume a CUDA device even when nothing is placed on one:

1. ``torch.cuda.current_device()`` is used as the ``device=`` of buffers (the global memory
   buffer used by attention, pipeline p2p receive buffers). On a CPU-only torch it raises.
   Here it returns ``torch.device("cpu")``, so those buffers land where everything else is.
2. The model-parallel RNG tracker (``model_parallel_cuda_manual_seed`` and
   ``get_cuda_rng_tracker().fork()``) saves and restores CUDA generator states. Here the
   tracker is replaced by :class:`CpuRNGStatesTracker`, which keeps one named CPU
   generator state per stream with the same seeding rule (data-parallel seed, tensor-parallel
   seed = seed + 2718 + tp_rank, ...), so ``fork()`` gives per-TP-rank streams as on GPU.
3. ``device="cuda"`` literals: the pipeline schedules allocate their token counter on CUDA
   (even at PP=1), the optimizer wrappers and the local multi-tensor gradient norm their
   scalar buffers, and the
   default causal mask (used when ``attention_mask`` is None) is built on CUDA; the
   pipeline's point-to-point exchange of tensor shapes (``variable_seq_lengths``, micro-
   batches of different widths) ends with ``torch.cuda.synchronize()``. Here those modules
   see a ``torch`` whose tensor factories map a CUDA device to CPU and whose
   ``cuda.synchronize`` does nothing (nothing runs asynchronously on a CPU), and the
   causal-mask helpers build on CPU.
4. Tied embeddings with PP > 1: ``LanguageModule.setup_embeddings_and_output_layer`` moves
   the last stage's copy of the word embeddings with ``weight.data.cuda()`` before the
   all-reduce that syncs it with the first stage. Here ``Tensor.cuda`` leaves the tensor on
   CPU for the duration of that one method.
5. Context parallelism: the rotary tables are cut to this CP rank's load-balanced chunks by
   ``get_pos_emb_on_this_cp_rank``, whose chunk index tensor is pinned and moved to CUDA.
   Here the same selection is done with a CPU index.

Settings that must stay off on CPU are not patched but checked where the model config is
built (:mod:`megatron_dgrpo.models.provider`): ``gradient_accumulation_fusion``,
``persist_layer_norm``, ``apply_rope_fusion``, ``batch_p2p_sync`` (it calls
``torch.cuda.synchronize()``), sequence parallelism and CP ring attention (TE only; CP
with ``cp_comm_type=allgather`` runs on the local spec), the distributed
optimizer (it refuses CPU tensors) and gradient clipping in Megatron's optimizer (it asserts
CUDA tensor types; use ``clip_grad=0.0``).

:func:`adapt_megatron_for_cpu` applies all of this only when CUDA is absent, and is
idempotent. Call it before building a model or initialising model parallelism.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Iterator
from typing import Any

import torch

_applied = False

_CPU = torch.device("cpu")


def _cpu_current_device() -> torch.device:
    """Stand-in for ``torch.cuda.current_device`` on CPU-only machines."""
    return _CPU


def _to_cpu_if_cuda(device: Any) -> Any:
    if device is None:
        return None
    if isinstance(device, int) or torch.device(device).type == "cuda":
        return _CPU
    return device


class _CudaWithoutSync(types.ModuleType):
    """A view of ``torch.cuda`` whose ``synchronize`` is a no-op; every other attribute
    is the real one (``current_device`` as adaptation 1 patched it)."""

    def __init__(self, real_cuda: types.ModuleType):
        super().__init__("torch.cuda")
        self._real = real_cuda

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class _CudaLiteralsOnCpu(types.ModuleType):
    """A view of ``torch`` whose tensor factories put ``device="cuda"`` tensors on CPU
    and whose ``torch.cuda.synchronize()`` does nothing.

    Installed as the ``torch`` global of Megatron modules that hard-code CUDA literals;
    every other attribute is the real ``torch`` one.
    """

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange")

    def __init__(self, real_torch: types.ModuleType):
        super().__init__("torch")
        self._real = real_torch
        for name in self._FACTORIES:
            setattr(self, name, self._redirect(getattr(real_torch, name)))
        self.cuda = _CudaWithoutSync(real_torch.cuda)

    @staticmethod
    def _redirect(factory):
        def on_cpu(*args, device=None, **kwargs):
            return factory(*args, device=_to_cpu_if_cuda(device), **kwargs)

        on_cpu.__name__ = factory.__name__
        return on_cpu

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _default_causal_mask_cpu(sq: int) -> torch.Tensor:
    """Causal mask [sq, sq], True above the diagonal (positions a query must not see)."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _sliding_window_causal_mask_cpu(sq: int, skv: int, window_size) -> torch.Tensor:
    """Sliding-window mask [sq, skv], True where attention is not allowed."""
    allowed = torch.ones(sq, skv, dtype=torch.bool)
    allowed = torch.triu(allowed, diagonal=skv - sq - window_size[0])
    allowed = torch.tril(allowed, diagonal=skv - sq + window_size[1])
    return ~allowed


def _keep_cuda_moves_on_cpu(method):
    """Wrap ``method`` so that ``Tensor.cuda()`` returns the tensor unchanged while it runs."""

    @functools.wraps(method)
    def on_cpu(*args, **kwargs):
        real_cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *_args, **_kwargs: tensor
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.cuda = real_cuda

    return on_cpu


def _pos_emb_on_this_cp_rank_cpu(pos_emb: torch.Tensor, seq_dim: int, cp_group) -> torch.Tensor:
    """This CP rank's load-balanced chunks of ``pos_emb`` along ``seq_dim`` (Megatron's
    layout, the one :func:`megatron_dgrpo.parallel.context.cp_shard` cuts)."""
    from megatron_dgrpo.parallel.context import cp_shard

    return cp_shard(pos_emb, cp_group.rank(), cp_group.size(), seq_dim)


def _new_cpu_state(seed: int) -> torch.Tensor:
    return torch.Generator().manual_seed(seed).get_state()


def _make_cpu_tracker_class():
    from megatron.core.tensor_parallel import random as mp_random

    class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """Named RNG streams kept as CPU generator states (same API as Megatron's tracker)."""

        def add(self, name: str, seed: int) -> None:
            if seed in self.seeds_:
                raise ValueError(f"RNG seed {seed} is already tracked")
            if name in self.states_:
                raise ValueError(f"RNG stream {name!r} is already tracked")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = _new_cpu_state(seed)

        @contextlib.contextmanager
        def fork(self, name: str = mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            if name not in self.states_:
                raise ValueError(f"RNG stream {name!r} was never added")
            outer_state = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer_state)

    return CpuRNGStatesTracker


def adapt_megatron_for_cpu() -> bool:
    """Make Megatron-core usable without CUDA. Returns True if the CPU adaptations are active.

    Does nothing (and returns False) when CUDA is available. Safe to call many times.
    """
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True

    from megatron.core import utils as core_utils
    from megatron.core.fusions import fused_softmax
    from megatron.core.models.common.embeddings import (
        rotary_pos_embedding,
        yarn_rotary_pos_embedding,
    )
    from megatron.core.models.common.language_module.language_module import (
        LanguageModule,
    )
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as optimizer_wrappers
    from megatron.core.pipeline_parallel import p2p_communication, schedules
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer import utils as transformer_utils

    torch.cuda.current_device = _cpu_current_device

    tracker_class = _make_cpu_tracker_class()
    mp_random._CUDA_RNG_STATE_TRACKER = tracker_class()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    cpu_factories = _CudaLiteralsOnCpu(torch)
    for module in (schedules, p2p_communication, optimizer_wrappers, clip_grads, core_utils):
        module.torch = cpu_factories
    for module in (transformer_utils, fused_softmax):
        module.get_default_causal_mask = _default_causal_mask_cpu
        module.get_sliding_window_causal_mask = _sliding_window_causal_mask_cpu

    LanguageModule.setup_embeddings_and_output_layer = _keep_cuda_moves_on_cpu(
        LanguageModule.setup_embeddings_and_output_layer)
    for module in (rotary_pos_embedding, yarn_rotary_pos_embedding):
        module.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank_cpu

    _applied = True
    return True


def is_adapted() -> bool:
    """True once :func:`adapt_megatron_for_cpu` has patched this process."""
    return _applied


def default_backend() -> str:
    """The torch.distributed backend for this machine: NCCL with CUDA, gloo without."""
    return "nccl" if torch.cuda.is_available() else "gloo"
