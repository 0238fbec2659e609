"""Trainer checkpoints: exact resume on real TP=2 ranks, atomicity, pruning, layout checks.

The reference is the uninterrupted run itself: a run that saves at step 2 and continues must
end bit-for-bit where a fresh set of processes ends after resuming from that checkpoint.
"""

import json
import os
import signal

import pytest
import torch

from megatron_dgrpo.parallel.launch import run_distributed
from megatron_dgrpo.train.checkpoint import STATE_FILE, checkpoint_dir, latest_checkpoint
from megatron_dgrpo.train.preemption import PreemptionGuard


def _build(tensor_parallel):
    """Tiny Qwen3 in Megatron DDP with Megatron's optimizer (what the trainer uses)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_dgrpo.models.config import ParallelConfig
    from megatron_dgrpo.models.presets import get_preset
    from megatron_dgrpo.models.provider import build_gpt_model, initialize_parallel

    config = get_preset("tiny-qwen3")
    parallel = ParallelConfig(tensor_parallel=tensor_parallel)
    initialize_parallel(parallel, seed=5)
    model = build_gpt_model(config, parallel)
    wrapped = DistributedDataParallel(config=model.config, module=model,
                                      ddp_config=DistributedDataParallelConfig())
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.0, params_dtype=torch.float32),
        [wrapped])
    return config, model, wrapped, optimizer


def _train_step(wrapped, optimizer):
    """One step whose data and noise come from the RNG streams a checkpoint must restore."""
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    ids = torch.randint(0, 1000, (2, 12))          # default torch stream (same on TP ranks)
    with get_cuda_rng_tracker().fork():              # Megatron's model-parallel stream
        noise = torch.rand(1).item()
    scale = 1.0 + random.random() + float(np.random.rand())  # Python and NumPy streams
    positions = torch.arange(12).unsqueeze(0).expand(2, -1)
    from megatron.core.distributed import finalize_model_grads

    wrapped.zero_grad_buffer()
    optimizer.zero_grad()
    loss = wrapped(ids, positions, None, labels=torch.roll(ids, -1, 1)).mean() * scale
    loss.backward()
    finalize_model_grads([wrapped])  # all-reduces the qk-layernorm grads over TP
    optimizer.step()
    return loss.item() + noise


def _run(rank, world_size, run_dir, resume):
    from megatron_dgrpo.train.checkpoint import load_training_checkpoint, save_training_checkpoint

    config, model, wrapped, optimizer = _build(world_size)
    first = 1
    if resume:
        restored = load_training_checkpoint(latest_checkpoint(run_dir), model, optimizer)
        first = restored["step"] + 1
        assert restored["state"] == {"sampler": {"position": restored["step"] * 2}}
    losses = []
    for step in range(first, 5):
        losses.append(_train_step(wrapped, optimizer))
        if not resume and step in (1, 2, 3):
            save_training_checkpoint(run_dir, step, model, config, optimizer,
                                     {"sampler": {"position": step * 2}}, keep_last=2)
            if step == 2:
                (checkpoint_dir(run_dir, 2) / "marker").write_text("2")
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()
               if not k.endswith("_extra_state")}
    return losses, weights


@pytest.mark.multiproc
def test_resume_from_step_two_is_bit_exact_at_tp2(tmp_path):
    straight = run_distributed(_run, 2, args=(str(tmp_path), False))
    # Three saves with keep_last=2: step 1 pruned, 2 and 3 kept, latest -> 3.
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [
        "step_00000002", "step_00000003"]
    assert latest_checkpoint(tmp_path).name == "step_00000003"
    # Resume from step 2: point `latest` there, as a requeue after a step-2 save would see.
    (tmp_path / "checkpoints" / "latest").write_text("step_00000002\n")
    resumed = run_distributed(_run, 2, args=(str(tmp_path), True))
    for rank in range(2):
        straight_losses, straight_weights = straight[rank]
        resumed_losses, resumed_weights = resumed[rank]
        assert resumed_losses == straight_losses[2:]
        assert straight_weights.keys() == resumed_weights.keys()
        for name in straight_weights:
            assert torch.equal(straight_weights[name], resumed_weights[name]), name


def _load_with_other_world_size(rank, world_size, ckpt):
    from megatron_dgrpo.train.checkpoint import ResumeError, load_training_checkpoint

    _, model, _, optimizer = _build(world_size)
    try:
        load_training_checkpoint(ckpt, model, optimizer)
    except ResumeError as exc:
        return str(exc)
    return None


@pytest.mark.multiproc
def test_resume_with_another_layout_is_refused(tmp_path):
    run_distributed(_run, 2, args=(str(tmp_path), False))
    [message] = run_distributed(_load_with_other_world_size, 1,
                                args=(str(latest_checkpoint(tmp_path)),))
    assert "saved by 2 ranks, this run has 1" in message


def test_partial_checkpoints_are_never_picked(tmp_path):
    root = tmp_path / "checkpoints"
    good = checkpoint_dir(tmp_path, 4)
    good.mkdir(parents=True)
    (good / STATE_FILE).write_text(json.dumps({"step": 4}))
    checkpoint_dir(tmp_path, 9).mkdir()                 # crashed before trainer_state.json
    (root / ".step_00000010.partial-x").mkdir()          # crashed before the rename
    assert latest_checkpoint(tmp_path) == good
    (root / "latest").write_text("step_00000009\n")     # pointer to an incomplete directory
    assert latest_checkpoint(tmp_path) == good
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_preemption_signal_is_recorded_and_handlers_restored():
    previous = signal.getsignal(signal.SIGUSR1)
    with PreemptionGuard() as guard:
        assert guard.should_stop() is False
        os.kill(os.getpid(), signal.SIGUSR1)
        assert guard.received == signal.SIGUSR1
        assert guard.should_stop() is True
    assert signal.getsignal(signal.SIGUSR1) is previous
