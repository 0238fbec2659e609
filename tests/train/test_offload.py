"""Teacher offload: a no-op on CPU; on CUDA the parameters leave the GPU between uses and the
outputs inside the block equal those of the never-offloaded model."""

import pytest
import torch

from megatron_dgrpo.train.offload import Offloader


def _frozen_model(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(),
                               torch.nn.Linear(512, 64)).to(device).requires_grad_(False)


def test_offload_is_a_no_op_on_cpu():
    model = _frozen_model("cpu")
    pointers = [p.data_ptr() for p in model.parameters()]
    offloader = Offloader(model, torch.device("cpu"), enabled=True)
    with offloader.on_device() as inside:
        assert inside is model
        assert [p.data_ptr() for p in model.parameters()] == pointers


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA: on CPU offloading is a no-op and accepts any model")
def test_only_frozen_models_are_offloaded():
    model = _frozen_model("cuda").requires_grad_(True)
    with pytest.raises(ValueError, match="only frozen models"):
        Offloader(model, torch.device("cuda"), enabled=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_frees_gpu_memory_between_uses_and_keeps_outputs():
    device = torch.device("cuda")
    model = _frozen_model(device)
    x = torch.randn(8, 256, device=device)
    expected = model(x)
    before = torch.cuda.memory_allocated()
    offloader = Offloader(model, device, enabled=True)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert torch.cuda.memory_allocated() <= before - size
    with offloader.on_device():
        assert all(p.device == torch.device("cuda", 0) for p in model.parameters())
        assert torch.equal(model(x), expected)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert torch.cuda.memory_allocated() <= before - size
