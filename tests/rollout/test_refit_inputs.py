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
from megatron_dgrpo.rollout.vllm_engine import VLLMEngine

IN_PROCESS = SimpleNamespace(in_process=True, on_cpu=True)
CHILD_ON_CPU = SimpleNamespace(in_process=False, on_cpu=True)


def test_transport_is_chosen_by_process_model():
    assert isinstance(select_transport(IN_PROCESS), DirectTransport)
    assert isinstance(select_transport(CHILD_ON_CPU), SerializedTransport)


def test_unknown_transport_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown refit transport 'rdma'.*serialized"):
        select_transport(IN_PROCESS, "rdma")


def test_direct_transport_needs_an_in_process_engine():
    with pytest.raises(ValueError, match="needs an in-process engine"):
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
