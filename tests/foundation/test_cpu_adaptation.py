"""The CPU adaptation of Megatron-core: idempotent, CPU-only, and what it changes works.

Each check runs in a fresh spawned process, because the adaptation patches process state.
"""

import pytest
import torch

from megatron_dgrpo.parallel.launch import run_distributed

pytestmark = pytest.mark.multiproc


def _adaptation_checks(rank, world_size):
    from megatron_dgrpo.parallel.cpu import adapt_megatron_for_cpu, is_adapted

    assert not is_adapted()
    assert adapt_megatron_for_cpu() is True
    first_tracker_state = _tracker_identity()
    assert adapt_megatron_for_cpu() is True  # idempotent: nothing replaced twice
    assert _tracker_identity() == first_tracker_state

    # 1. current_device no longer raises and points at the CPU.
    assert torch.cuda.current_device() == torch.device("cpu")

    # 2. The RNG tracker: per-TP-rank streams on the CPU generator, outer state restored.
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import (
        get_cuda_rng_tracker, model_parallel_cuda_manual_seed)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(99)
    outer_expected = torch.rand(3, generator=torch.Generator().manual_seed(99))
    with get_cuda_rng_tracker().fork():
        tp_draw = torch.rand(4)
    outer_after_fork = torch.rand(3)
    # The default stream must be untouched by the fork.
    assert torch.equal(outer_after_fork, outer_expected)
    # Megatron's rule: tensor-parallel seed = seed + 2718 + tp_rank.
    expected_tp = torch.rand(4, generator=torch.Generator().manual_seed(1234 + 2718 + rank))
    assert torch.equal(tp_draw, expected_tp)
    with get_cuda_rng_tracker().fork():  # the stream continues, it does not restart
        second = torch.rand(4)
    gen = torch.Generator().manual_seed(1234 + 2718 + rank)
    torch.rand(4, generator=gen)
    assert torch.equal(second, torch.rand(4, generator=gen))

    # 3. CUDA literals: the default causal mask and the schedule's token counter.
    from megatron.core.transformer import utils as transformer_utils
    from megatron.core.pipeline_parallel import schedules
    mask = transformer_utils.get_default_causal_mask(4)
    assert mask.device.type == "cpu"
    assert torch.equal(mask, torch.ones(4, 4).triu(1).bool())
    counter = schedules.torch.zeros([], dtype=torch.int, device="cuda")
    assert counter.device.type == "cpu"
    assert schedules.torch.float32 is torch.float32
    parallel_state.destroy_model_parallel()
    return True


def _tracker_identity():
    from megatron.core.tensor_parallel import random as mp_random
    return id(mp_random._CUDA_RNG_STATE_TRACKER)


def test_cpu_adaptation_on_two_tensor_parallel_ranks():
    assert run_distributed(_adaptation_checks, 2) == [True, True]


def test_backend_choice_follows_cuda():
    from megatron_dgrpo.parallel.cpu import default_backend
    assert default_backend() == ("nccl" if torch.cuda.is_available() else "gloo")


def _optimizer_literals(rank, world_size):
    from megatron_dgrpo.parallel.cpu import adapt_megatron_for_cpu

    adapt_megatron_for_cpu()
    from megatron.core import utils as core_utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as optimizer_wrappers
    devices = {m.__name__: m.torch.tensor([1.0], device="cuda").device.type
               for m in (optimizer_wrappers, clip_grads, core_utils)}
    # The module's own calls take the same path: the local multi-tensor L2 norm.
    norm, _ = core_utils.local_multi_tensor_l2_norm(
        2048, torch.zeros(1, dtype=torch.int), [[torch.tensor([3.0, 4.0])]], False)
    return devices, norm.item()


def test_optimizer_and_grad_norm_buffers_land_on_cpu():
    [(devices, norm)] = run_distributed(_optimizer_literals, 1)
    assert set(devices.values()) == {"cpu"}
    assert norm == 5.0
