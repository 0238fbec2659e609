"""The refit bridge: stream a live Megatron model's weights into the vLLM engine in place.

Three pieces, composed by :func:`refit`:

1. :func:`hf_weight_buckets` (every trainer rank of one model replica): walks the
   parameters of all pipeline stages (with virtual stages: all ``PP x VP`` of them, each
   sent by the rank that holds it) in table order (:mod:`megatron_dgrpo.models.
   mapping`, the same table as checkpoint conversion), packs consecutive parameters of one
   stage into buckets of at most ``bucket_mb`` MB (a larger parameter is a bucket alone),
   all-gathers each bucket's TP shards in one flat collective, merges them into full
   tensors, converts them to Hugging Face ``(name, tensor)`` pairs and, for stages other
   than the receiver's, sends them to the receiver (the replica's first global rank, 0 by
   default) point-to-point. Only the receiver yields buckets; the other ranks take part in
   the collectives and yield nothing. At most one bucket of
   full tensors (plus its shards) exists at a time: never a second copy of the model.
2. A transport moves each bucket into the engine's worker (selected by
   :func:`select_transport`): the tensors themselves when the engine is in-process (any
   device), pickled through vLLM's RPC when it runs in a child process on CPU, CUDA IPC
   handles when it runs in a child process on GPU.
3. On the worker, the functions of :mod:`megatron_dgrpo.rollout.vllm_worker`
   (``begin_weight_update`` / ``load_weight_bucket`` / ``finish_weight_update``) write the
   weights, straight into unpacked CPU linears or through vLLM's layer-wise reload.

:func:`refit` also checks that every HF tensor of the model was delivered
(:class:`IncompleteRefitError` otherwise): on the direct path a missing tensor would
silently keep its old value. The KV prefix cache is reset afterwards (its blocks were
computed with the old weights).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from megatron_dgrpo.models import mapping
from megatron_dgrpo.models.chunks import live_stages, pipeline_stages, stage_owner
from megatron_dgrpo.models.config import ModelConfig
from megatron_dgrpo.models.mapping import StageParam, TPSplit
from megatron_dgrpo.parallel.collectives import (
    all_gather_tensors,
    group_ranks,
    recv_tensor,
    send_tensor,
    world_rank,
)
from megatron_dgrpo.rollout.vllm_worker import (
    Bucket,
    begin_weight_update,
    cuda_device_uuid,
    finish_weight_update,
    load_serialized_bucket,
    load_weight_bucket,
    load_weight_bucket_ipc,
)

@dataclass
class RefitReport:
    """What one refit moved and where the time went (seconds, wall clock on the receiver).

    ``produce_seconds``: waiting for buckets (TP gather, HF mapping, pipeline-stage
    receives); ``load_seconds``: transport plus the engine writing the weights (in a
    layer-wise reload this includes the CPU backend's repacking of each completed layer);
    ``finish_seconds``: the engine's end-of-update step (layer-wise finalisation and
    embedding repack, or nothing much on the direct path); ``direct``: whether the buckets
    were written straight into the engine's live parameters.
    """

    tensors: int
    bytes: int
    buckets: int
    seconds: float
    produce_seconds: float
    load_seconds: float
    finish_seconds: float
    direct: bool

    @property
    def gb_per_second(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------
# Trainer side: gather, map, bucket


@dataclass(frozen=True)
class _Layout:
    tp: int
    tp_rank: int
    pp: int
    pp_rank: int
    stages: int  # PP x virtual stages; stage s lives on pipeline rank s % PP
    tp_group: Any
    pp_group_ranks: list[int]  # global ranks of this rank's pipeline group, by pipeline rank

    def owner(self, stage: int) -> int:
        """The global rank (of this TP rank's pipeline) holding ``stage``."""
        return self.pp_group_ranks[stage_owner(stage, self.pp)]


def _layout() -> _Layout:
    from megatron.core import parallel_state as ps

    pp_group = ps.get_pipeline_model_parallel_group()
    return _Layout(ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
                   ps.get_pipeline_model_parallel_world_size(),
                   ps.get_pipeline_model_parallel_rank(), pipeline_stages(),
                   ps.get_tensor_model_parallel_group(), group_ranks(pp_group))


def live_parameters(model: torch.nn.Module, config: ModelConfig
                    ) -> dict[int, dict[str, torch.Tensor]]:
    """Stage -> local-spec name -> live tensor, for each stage this rank holds (one, or one
    per chunk with virtual pipeline stages), checked against the table (ValueError naming
    any parameter the mapping does not know or misses)."""
    stages = pipeline_stages()
    return {stage: {name: tensor for name, (_, tensor)
                    in mapping.live_parameters(chunk, config, stage, stages).items()}
            for chunk, stage in live_stages(model)}


def _plan(config: ModelConfig, layout: _Layout,
          bucket_bytes: int) -> list[tuple[int, list[StageParam]]]:
    """Buckets as (pipeline stage, parameters); each parameter exported once."""
    itemsize = 2 if config.params_dtype == "bf16" else 4
    buckets: list[tuple[int, list[StageParam]]] = []
    for stage in range(layout.stages):
        current: list[StageParam] = []
        size = 0
        for param in mapping.stage_params(config, stage, layout.stages):
            if not param.rule.exported:
                continue
            nbytes = itemsize * math.prod(mapping.megatron_full_shape(param, config))
            if current and size + nbytes > bucket_bytes:
                buckets.append((stage, current))
                current, size = [], 0
            current.append(param)
            size += nbytes
        if current:
            buckets.append((stage, current))
    return buckets


def _gather_full(params: list[StageParam], live: dict[str, torch.Tensor], config: ModelConfig,
                 layout: _Layout) -> list[torch.Tensor]:
    """Full (merged, unpadded) tensors of ``params``: one all-gather of flat shards.

    At TP=1 no copy is made: each result is the live parameter itself (a view without the
    vocabulary padding rows), to be read, not written."""
    shards = [live[p.local_name].detach() for p in params]
    if layout.tp == 1:
        return [s[:config.vocab_size] if p.rule.split is TPSplit.VOCAB else s
                for p, s in zip(params, shards)]
    flat = torch.cat([s.reshape(-1) for s in shards])
    gathered = all_gather_tensors(flat, layout.tp_group)
    fulls, offset = [], 0
    for param, shard in zip(params, shards):
        n = shard.numel()
        per_rank = [g[offset:offset + n].view(shard.shape) for g in gathered]
        fulls.append(mapping.merge_tp_shards(param.rule.split, per_rank, config.vocab_size))
        offset += n
    return fulls


def _hf_shapes_of(params: list[StageParam],
                  config: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    values = mapping.dims(config)
    return [(name, tuple(values[d] for d in symbolic)) for p in params
            for name, symbolic in zip(mapping.hf_names(p), p.rule.hf_shapes)]


def hf_weight_buckets(model: torch.nn.Module, config: ModelConfig,
                      bucket_mb: float = 256.0, receiver: int = 0) -> Iterator[Bucket]:
    """Buckets of ``(hf_name, full tensor)`` pairs, yielded on global rank ``receiver`` only
    (the first rank of the replica: TP, CP and pipeline rank 0).

    Checks the arguments and the live parameters against the mapping table at once
    (ValueError), then returns the iterator.

    Call on every rank of the receiver's model replica, with the rank's unwrapped
    ``GPTModel`` (or its ``VirtualStages``); iterate to the end on every rank (the iteration runs
    the collectives). Tensors keep the trainer's dtype and device; each bucket holds at most
    ``bucket_mb`` MB of full tensors, or one parameter if that is larger. At TP=1 tensors
    that need no re-layout are views of the live parameters: consume them before the next
    optimizer step and never write to them.
    """
    if bucket_mb <= 0:
        raise ValueError(f"refit bucket size must be > 0 MB, got {bucket_mb}")
    layout = _layout()
    live = live_parameters(model, config)
    return _stream_buckets(live, config, layout, int(bucket_mb * 1e6), receiver)


def _stream_buckets(live: dict[int, dict[str, torch.Tensor]], config: ModelConfig,
                    layout: _Layout, bucket_bytes: int, receiver: int) -> Iterator[Bucket]:
    """The generator behind :func:`hf_weight_buckets` (arguments already checked)."""
    like = next(iter(next(iter(live.values())).values()))
    is_receiver = world_rank() == receiver
    in_receiver_pipeline = layout.pp_group_ranks[0] == receiver
    for stage, params in _plan(config, layout, bucket_bytes):
        if stage in live:
            fulls = _gather_full(params, live[stage], config, layout)
            pairs = [pair for p, full in zip(params, fulls)
                     for pair in mapping.megatron_to_hf(p, full, config)]
            if is_receiver:
                yield pairs
            elif layout.pp_rank > 0 and layout.tp_rank == 0 and in_receiver_pipeline:
                send_tensor(torch.cat([t.reshape(-1) for _, t in pairs]), dst=receiver)
        elif is_receiver:
            yield _receive(params, config, like, src=layout.owner(stage))


def _receive(params: list[StageParam], config: ModelConfig, like: torch.Tensor,
             src: int) -> Bucket:
    """Receiver: the HF tensors of ``params``, sent flat by global rank ``src`` (the first TP
    rank of their stage); dtype and device those of ``like``."""
    named_shapes = _hf_shapes_of(params, config)
    flat = torch.empty(sum(math.prod(s) for _, s in named_shapes), dtype=like.dtype,
                       device=like.device)
    recv_tensor(flat, src=src)
    pairs, offset = [], 0
    for name, shape in named_shapes:
        pairs.append((name, flat[offset:offset + math.prod(shape)].view(shape)))
        offset += math.prod(shape)
    return pairs


# ---------------------------------------------------------------------------------------
# Transports


class DirectTransport:
    """Engine worker in this process (engine TP = 1, in-process engine): hand the tensors
    over as they are (no copy until vLLM's)."""

    def send(self, engine, bucket: Bucket) -> None:
        engine.run_on_worker(load_weight_bucket, bucket)


class SerializedTransport:
    """Engine workers in child processes on CPU: each bucket travels through vLLM's RPC as
    one flat byte string per dtype plus names, shapes and the dtype (plain types survive its
    msgpack); with engine tensor parallelism every worker receives it and loads its slice."""

    def send(self, engine, bucket: Bucket) -> None:
        by_dtype: dict[torch.dtype, Bucket] = {}
        for name, tensor in bucket:
            by_dtype.setdefault(tensor.dtype, []).append((name, tensor))
        for dtype, part in by_dtype.items():
            flat = torch.cat([t.detach().reshape(-1).cpu() for _, t in part])
            engine.run_on_worker(load_serialized_bucket, [n for n, _ in part],
                                 [list(t.shape) for _, t in part], str(dtype),
                                 flat.view(torch.uint8).numpy().tobytes())


class CudaIpcTransport:
    """Engine in a child process on the same GPU: share CUDA memory by IPC handles.

    The bucket's tensors stay alive until the worker has loaded them (``send`` returns
    after the RPC completes). Needs CUDA; refuses to be built without it.
    """

    def __init__(self) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA IPC refit needs CUDA; on CPU the engine must be "
                               "in-process or use SerializedTransport")

    def send(self, engine, bucket: Bucket) -> None:
        from torch.multiprocessing.reductions import reduce_tensor

        kept = [t.detach().contiguous() for _, t in bucket]
        handles = [reduce_tensor(t)[1] for t in kept]
        engine.run_on_worker(load_weight_bucket_ipc, [n for n, _ in bucket], handles,
                             cuda_device_uuid(kept[0].device))
        torch.cuda.synchronize()
        del kept


def select_transport(engine, transport: str = "auto"):
    """``"direct"``, ``"serialized"``, ``"cuda_ipc"`` or ``"auto"`` (by where the engine's
    workers run and the device): direct when the one worker is in this process."""
    choices = {"direct": DirectTransport, "serialized": SerializedTransport,
               "cuda_ipc": CudaIpcTransport}
    if transport == "auto":
        if engine.workers_in_process:
            transport = "direct"
        else:
            transport = "serialized" if engine.on_cpu else "cuda_ipc"
    if transport not in choices:
        raise ValueError(f"unknown refit transport {transport!r}; "
                         f"choose from auto, {', '.join(choices)}")
    if transport == "direct" and not engine.workers_in_process:
        raise ValueError("the direct refit transport needs the engine's worker in this "
                         "process (an in-process engine at engine tensor parallel 1)")
    return choices[transport]()


class IncompleteRefitError(RuntimeError):
    """A refit's bucket stream lacked some of the model's HF tensors (the engine keeps stale
    or, in a layer-wise reload, unprocessed values for them)."""


def push_buckets(engine, buckets: Iterable[Bucket], transport=None,
                 expected_names: Iterable[str] | None = None) -> RefitReport:
    """Load HF-named buckets into ``engine`` in place (on the engine's rank); returns what
    moved.

    With ``expected_names`` (every HF tensor name of the model), raises
    :class:`IncompleteRefitError` naming those the stream did not deliver.
    """
    transport = transport or select_transport(engine)
    start = time.perf_counter()
    tensors = nbytes = count = 0
    produce = load = 0.0
    delivered: set[str] = set()
    direct = engine.run_on_worker(begin_weight_update)
    try:
        iterator = iter(buckets)
        while True:
            tick = time.perf_counter()
            bucket = next(iterator, None)
            produce += time.perf_counter() - tick
            if bucket is None:
                break
            tick = time.perf_counter()
            transport.send(engine, bucket)
            load += time.perf_counter() - tick
            delivered.update(name for name, _ in bucket)
            tensors += len(bucket)
            nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            count += 1
    finally:
        tick = time.perf_counter()
        engine.run_on_worker(finish_weight_update, direct)
        engine.reset_prefix_cache()
        finish = time.perf_counter() - tick
    missing = sorted(set(expected_names or ()) - delivered)
    if missing:
        raise IncompleteRefitError(
            f"refit delivered no tensor for {len(missing)} parameter(s): "
            f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}; the engine "
            f"does not hold the trainer's weights")
    return RefitReport(tensors, nbytes, count, time.perf_counter() - start, produce, load,
                       finish, direct)


def refit(engine, model: torch.nn.Module, config: ModelConfig, bucket_mb: float = 256.0,
          transport: str = "auto", receiver: int = 0) -> RefitReport | None:
    """Stream ``model``'s weights into ``engine`` (call on every trainer rank of the
    replica whose first rank, global rank ``receiver``, holds ``engine``; None elsewhere).

    Returns the :class:`RefitReport` on the receiver and None on the other ranks.
    """
    buckets = hf_weight_buckets(model, config, bucket_mb, receiver)
    if engine is None:
        for _ in buckets:  # not the receiver: take part in the collectives only
            pass
        return None
    return push_buckets(engine, buckets, select_transport(engine, transport),
                        expected_names=mapping.hf_shapes(config))
