"""One TP=2 dGRPO step pinned to recorded values: loss, metrics and updated weights.

The expected values in ``pinned/dgrpo_tp2_step.json`` were recorded with the trainer as it
stood *before* the architecture refactor (commit 7c1c2f6), by::

    .venv/bin/python tests/train/test_pinned_step.py --record

and re-recorded once, deliberately, when the fused loss's backward began to recompute the
probabilities as ``exp(z - lse)`` block by block (instead of reusing ``exp(z - max)`` and
scaling): loss and metrics unchanged, grad norm within 1.2e-8 relative, the updated
weights' fingerprints within 2.1e-5 (Adam's first step is ~``lr * sign(grad)``, so
elements with near-zero gradients move with float32 rounding).

Inputs are fixed files (``pinned/tokenizer``, ``pinned/data``: 4 synthetic tasks), not the
generator's current output, so the pin guards the training step only. Every option the
step reads is set explicitly, so a later change of a default does not move it. Re-record
only for a deliberate change of the step's numerics, and say so in the commit.

The step runs with ``ATEN_CPU_CAPABILITY=avx2``: the recorded values are reproduced with
PyTorch's AVX2 CPU kernels, and its AVX-512 kernels round differently. Metrics agree across the two to ~1e-7
relative, but Adam's first step (~``lr * g / (|g| + eps)``) amplifies that rounding in the
elements with near-zero gradients: on an AVX-512 EPYC the weight fingerprints moved by up to
1.3e-4 relative (measured 2026-12-02; with ``avx2`` forced they match to 1e-6 again). Forcing
the kernel set keeps the pin machine-independent on x86 without loosening it.

Weights are compared through per-tensor fingerprints: the sum and three fixed random
projections of each tensor (float64), which move with any change of any element.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

PINNED = Path(__file__).parent / "pinned"
EXPECTED = PINNED / "dgrpo_tp2_step.json"
NON_DETERMINISTIC = ("time", "time/", "throughput/", "memory/")


def pinned_config(run_dir: str) -> dict:
    return {
        "run_dir": run_dir, "seed": 1234, "steps": 1, "save_every": 1, "keep_last": 1,
        "prompts_per_step": 4, "tokenizer": str(PINNED / "tokenizer"),
        "parallel": {"tensor_parallel": 2},
        "student": {"preset": "tiny-qwen3"}, "teacher": {"preset": "small-qwen3"},
        "loss": {"objective": "dgrpo", "kl_coef": 0.04, "kl_estimator": "full",
                 "eps_low": 0.2, "eps_high": 0.28, "tis_cap": 2.0, "aggregation": "token_mean"},
        "loss_impl": "fused",
        "sampling": {"n": 2, "max_new_tokens": 6, "temperature": 1.0},
        "rollout": {"engine": "embedded"},
        "data": {"paths": [str(PINNED / "data")], "max_prompt_tokens": 4096},
        "rewards": {"per_task": {}, "default": "pinned_answer_parity"},
        "optim": {"lr": 1e-3},
    }


def fingerprint(tensor: torch.Tensor) -> list[float]:
    """Sum and three fixed random projections of ``tensor`` (float64)."""
    flat = tensor.detach().double().reshape(-1)
    generator = torch.Generator().manual_seed(20261201)
    probes = torch.rand(3, flat.numel(), generator=generator, dtype=torch.float64) * 2 - 1
    return [float(flat.sum())] + (probes @ flat).tolist()


def _step(rank, world_size, run_dir):
    from safetensors.torch import load_file

    from megatron_dgrpo.config import from_dict
    from megatron_dgrpo.data.rewards import register_reward
    from megatron_dgrpo.train.config import RunConfig
    from megatron_dgrpo.train.metrics import read_metrics
    from megatron_dgrpo.train.runner import run_training

    # Random models never answer correctly: a reward that varies within a group keeps the
    # advantages (and so the policy-gradient term) non-zero.
    register_reward("pinned_answer_parity")(lambda answer, reference: float(sum(map(ord, answer)) % 2))
    assert run_training(from_dict(RunConfig, pinned_config(run_dir)), show_progress=False) == 0
    if rank != 0:
        return None
    model = Path(run_dir) / "checkpoints" / "step_00000001" / "model"
    prints = {f"{tp}/{name}": fingerprint(value) for tp in range(2)
              for name, value in load_file(model / f"mp_rank_{tp:02d}_000" /
                                           "model.safetensors").items()}
    (record,) = read_metrics(run_dir)
    metrics = {k: v for k, v in record.items() if k != "step" and not k.startswith(NON_DETERMINISTIC)}
    return {"metrics": metrics, "weights": prints}


def run_pinned_step(run_dir: str) -> dict:
    from megatron_dgrpo.parallel.launch import run_distributed

    saved = os.environ.get("ATEN_CPU_CAPABILITY")
    os.environ["ATEN_CPU_CAPABILITY"] = "avx2"  # read by the spawned ranks' torch
    try:
        return run_distributed(_step, 2, args=(run_dir,))[0]
    finally:
        if saved is None:
            del os.environ["ATEN_CPU_CAPABILITY"]
        else:
            os.environ["ATEN_CPU_CAPABILITY"] = saved


@pytest.mark.multiproc
def test_dgrpo_tp2_step_matches_the_recorded_values(tmp_path):
    expected = json.loads(EXPECTED.read_text())
    got = run_pinned_step(str(tmp_path / "run"))
    assert expected["metrics"].keys() <= got["metrics"].keys()  # later metrics may be added
    for key, value in expected["metrics"].items():
        if value is None:
            assert got["metrics"][key] is None, key
        else:
            assert got["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    assert got["weights"].keys() == expected["weights"].keys()
    for name, prints in expected["weights"].items():
        assert got["weights"][name] == pytest.approx(prints, rel=1e-6, abs=1e-6), name


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        EXPECTED.write_text(json.dumps(run_pinned_step(str(Path(tmp) / "run")), indent=1) + "\n")
    print(f"wrote {EXPECTED}")
