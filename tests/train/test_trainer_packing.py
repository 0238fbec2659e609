"""`dgrpo train` with packed sequences (``pack_sequences``, THD) on real TP=2 ranks.

Reference: the same step with right-padded micro-batches. Packing changes which token
positions the forwards run over, not any token's result: attention stays within each
sequence and rotary positions restart per sequence, so the loss, every metric (padding
aside) and the updated weights must equal the padded step's, for dGRPO (embedded rollouts,
reference log-probs scored on the packs, teacher hidden states on the packs) and KD (fused
and materialised logits). ``train/padding_fraction`` is 0 for packs (no alignment at TP=2
without sequence parallelism) and the padded micro-batches' share otherwise.
"""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from megatron_dgrpo.config import from_dict
from megatron_dgrpo.models.presets import get_preset
from megatron_dgrpo.parallel.launch import run_distributed
from megatron_dgrpo.testing.runs import train_runs
from megatron_dgrpo.train.config import RunConfig
from megatron_dgrpo.train.metrics import read_metrics

NON_DETERMINISTIC = ("time", "time/", "throughput/", "memory/")
PADDING = "train/padding_fraction"


@pytest.fixture(scope="module")
def setup(make_synth_setup):
    return make_synth_setup("packed-train", num=8, seed=23)


def _config(setup, run_name, objective, **top_level):
    root, tokenizer_dir, vocab = setup
    student = dataclasses.asdict(dataclasses.replace(get_preset("tiny-qwen3"), vocab_size=vocab))
    teacher = dataclasses.asdict(dataclasses.replace(get_preset("small-qwen3"), vocab_size=vocab))
    return {"run_dir": str(root / run_name), "steps": 1, "save_every": 1,
            "prompts_per_step": 4, "tokenizer": str(tokenizer_dir),
            "parallel": {"tensor_parallel": 2},
            "student": {"preset": None, "model": student},
            "teacher": {"preset": None, "model": teacher},
            "loss": {"objective": objective, **({"ref_kl_coef": 0.05} if objective == "dgrpo"
                                                else {})},
            "sampling": {"n": 2, "max_new_tokens": 8, "temperature": 1.0},
            "loss_chunk_tokens": 7,
            "data": {"paths": [str(root / "data")], "max_prompt_tokens": 2048},
            "optim": {"lr": 1e-4}, **top_level}


def _weights(run_dir):
    shard = f"{run_dir}/checkpoints/step_00000001/model"
    return {f"{tp}/{k}": v for tp in range(2)
            for k, v in load_file(f"{shard}/mp_rank_{tp:02d}_000/model.safetensors").items()}


@pytest.mark.multiproc
def test_packed_step_equals_padded_step(setup):
    runs = []
    for objective, impl in (("dgrpo", "fused"), ("kd", "fused"), ("kd", "materialized")):
        # 4 rows per micro-batch: rows of different prompts (dGRPO's 2 rollouts of a
        # prompt have the same length when neither stops early), so padding > 0
        padded = _config(setup, f"padded-{objective}-{impl}", objective, loss_impl=impl,
                         micro_batch_size=4)
        # ~2 of the ~300-token rows per pack: several packs, rows of different lengths
        packed = _config(setup, f"packed-{objective}-{impl}", objective, loss_impl=impl,
                         pack_sequences=True, pack_tokens=700)
        runs.append((padded, packed))
    configs = [config for pair in runs for config in pair]
    assert run_distributed(train_runs, 2, args=(configs,)) == [[0] * len(configs)] * 2
    for padded, packed in runs:
        (expected,), (got,) = read_metrics(padded["run_dir"]), read_metrics(packed["run_dir"])
        assert expected[PADDING] > 0.01 and got[PADDING] == 0.0
        expected, got = ({k: v for k, v in r.items() if not k.startswith(NON_DETERMINISTIC)
                          and k != PADDING} for r in (expected, got))
        assert got.keys() == expected.keys() and expected["loss"] != 0
        for key in expected:
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), (packed, key)
        expected_weights, got_weights = _weights(padded["run_dir"]), _weights(packed["run_dir"])
        for key in expected_weights:
            torch.testing.assert_close(got_weights[key], expected_weights[key], rtol=0,
                                       atol=1e-5, msg=key)


def test_packing_options_are_checked_at_start_up(setup):
    with pytest.raises(ValueError, match="pack_tokens must be >= 1"):
        from_dict(RunConfig, _config(setup, "never-created", "kd", pack_tokens=0))
    assert not (setup[0] / "never-created").exists()
    notices = from_dict(RunConfig, _config(setup, "never-created", "kd", pack_sequences=True,
                                           micro_batch_size=1)).notices()
    assert any(n.startswith("micro_batch_size has no effect here") for n in notices)
