"""Bad refit / engine inputs fail at once with a message that says what to do (no engine
is started: the checks run before vLLM is touched)."""

from types import SimpleNamespace

import pytest
import torch

from megatron_dgrpo.models.config import ModelConfig
from megatron_dgrpo.rollout.refit import (
    DirectTransport,
    SerializedTransport,
    hf_weight_buckets,
    select_transport,
)
from megatron_dgrpo.rollout.vllm_engine import (
    EngineUnavailableError,
    VLLMEngine,
    check_engine_tensor_parallel,
    cpu_worker_binding,
    engine_visible_devices,
)
from megatron_dgrpo.rollout.vllm_worker import merge_worker_fingerprints

IN_PROCESS = SimpleNamespace(workers_in_process=True, on_cpu=True)
CHILD_ON_CPU = SimpleNamespace(workers_in_process=False, on_cpu=True)


def test_transport_is_chosen_by_where_the_workers_run():
    assert isinstance(select_transport(IN_PROCESS), DirectTransport)
    assert isinstance(select_transport(CHILD_ON_CPU), SerializedTransport)


def test_engine_tensor_parallel_must_split_the_heads():
    config = ModelConfig(num_attention_heads=8, num_query_groups=2)
    for tp in (1, 2, 4, 8):  # 4 and 8: each key/value head replicated over 2 and 4 workers
        check_engine_tensor_parallel(config, tp)
    with pytest.raises(ValueError, match=r"num_attention_heads \(8\) divisible"):
        check_engine_tensor_parallel(config, 3)
    with pytest.raises(ValueError, match=r"num_query_groups \(4\) divisible by it or"):
        check_engine_tensor_parallel(ModelConfig(num_attention_heads=24, num_query_groups=4), 6)


def test_cpu_workers_split_the_cpus_and_need_one_each():
    assert cpu_worker_binding(2, [0, 1]) == "0|1"
    assert cpu_worker_binding(2, [3, 0, 1, 2]) == "0,1|2,3"
    assert cpu_worker_binding(3, range(7)) == "0,1|2,3|4,5,6"
    with pytest.raises(EngineUnavailableError, match="engine tensor parallel 4 needs at least "
                                                     "4 CPUs, this process may use 2"):
        cpu_worker_binding(4, [0, 1])


def test_gpu_engine_workers_see_the_gpus_from_the_leaders_on():
    assert engine_visible_devices(None, 4, 2, 8) == "4,5"
    assert engine_visible_devices("2,3,6,7", 1, 2, 4) == "3,6"
    with pytest.raises(EngineUnavailableError, match="needs GPUs 6..9, but this process sees 8"):
        engine_visible_devices(None, 6, 4, 8)


def test_worker_fingerprints_tile_shards_and_keep_every_replica():
    worker0 = ("torch.float32", {"col": [(0, [1.0, 2.0])], "norm": [(0, [5.0, 6.0])],
                                 "emb": [(0, [1.0]), (0, [7.0])], "gone": [(0, [1.0])]})
    worker1 = ("torch.float32", {"col": [(2, [3.0])], "norm": [(0, [5.0, 9.0])],
                                 "emb": [(1, [2.0]), (1, [8.0])], "gone": []})
    dtype, merged = merge_worker_fingerprints([worker0, worker1])
    assert dtype == "torch.float32"
    assert merged["col"] == [[1.0, 2.0, 3.0]]          # shards by offset
    assert merged["norm"] == [[5.0, 6.0], [5.0, 9.0]]  # each worker's copy on its own
    assert merged["emb"] == [[1.0, 2.0], [7.0, 8.0]]   # per path
    assert merged["gone"] == []                        # missing on a worker: missing
    with pytest.raises(RuntimeError, match="different dtypes"):
        merge_worker_fingerprints([worker0, ("torch.bfloat16", worker1[1])])


def test_unknown_transport_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown refit transport 'rdma'.*serialized"):
        select_transport(IN_PROCESS, "rdma")


def test_direct_transport_needs_the_worker_in_this_process():
    with pytest.raises(ValueError, match="needs the engine's worker in this process"):
        select_transport(CHILD_ON_CPU, "direct")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cuda_ipc_transport_is_refused_without_cuda():
    with pytest.raises(RuntimeError, match="CUDA IPC refit needs CUDA"):
        select_transport(CHILD_ON_CPU, "cuda_ipc")


def test_non_positive_bucket_size_fails_before_any_iteration():
    with pytest.raises(ValueError, match="bucket size must be > 0 MB, got 0"):
        hf_weight_buckets(torch.nn.Linear(2, 2), ModelConfig(), bucket_mb=0)


def test_unknown_cpu_linear_mode_is_refused_before_start_up(tmp_path):
    with pytest.raises(ValueError, match="unknown cpu_linear 'mkl'; choose from onednn, torch"):
        VLLMEngine(tmp_path, cpu_linear="mkl")


def test_engine_tensor_parallel_beyond_the_cpus_is_refused_at_start_up():
    from megatron_dgrpo.models.config import Runtime
    from megatron_dgrpo.train.config import RolloutConfig

    wide = ModelConfig(num_attention_heads=1024, num_query_groups=1024, head_dim=32)
    rollout = RolloutConfig(engine="vllm", engine_tensor_parallel=1024)
    with pytest.raises(ValueError, match="rollout.engine_tensor_parallel=1024 \\(the student\\): "
                                         "vLLM's CPU backend runs one worker per CPU group"):
        rollout.check_engine_split(wide, Runtime(cuda=False, transformer_engine=False),
                                   "the student")
    # on CUDA the CPUs do not matter (the GPUs are checked against the replica's size)
    rollout.check_engine_split(wide, Runtime(cuda=True, transformer_engine=True), "the student")
