"""`dgrpo train` with context parallelism on real CP=2 ranks (gloo, cp_comm_type=allgather:
the local layer spec's SDPA attention over all-gathered keys/values).

Reference: the unsharded run. The same step at CP=1 on one rank must give the same loss,
metrics and updated weights (to fp32 rounding), for the fused and the materialized loss,
with micro-batches and a teacher running on its shards too. With vLLM rollouts, the
trainer's CP forward must reproduce the engine's log-probs of the sampled tokens (refit
verification, with YaRN rotary scaling on both sides) and its reference log-probs are
gathered back over the CP ranks.
"""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from megatron_dgrpo.models.presets import get_preset
from megatron_dgrpo.parallel.launch import run_distributed
from megatron_dgrpo.testing.runs import train_runs
from megatron_dgrpo.train.metrics import read_metrics

pytestmark = pytest.mark.multiproc

NON_DETERMINISTIC = ("time/", "throughput/", "memory/")
CONTEXT_PARALLEL = {"context_parallel": 2, "cp_comm_type": "allgather"}
TOLERANCE = 1e-3  # nats, engine vs trainer (fp32 agree to ~1e-5)


@pytest.fixture(scope="module")
def setup(make_synth_setup):
    return make_synth_setup("cp-train", num=4, seed=11)


def _config(setup, run_name, objective, parallel, **top_level):
    root, tokenizer_dir, vocab = setup
    student = dataclasses.asdict(dataclasses.replace(get_preset("tiny-qwen3"), vocab_size=vocab))
    teacher = dataclasses.asdict(dataclasses.replace(get_preset("small-qwen3"), vocab_size=vocab))
    return {"run_dir": str(root / run_name), "steps": 1, "save_every": 1,
            "prompts_per_step": 2, "tokenizer": str(tokenizer_dir), "parallel": parallel,
            "student": {"preset": None, "model": student},
            "teacher": {"preset": None, "model": teacher},
            "loss": {"objective": objective},
            "data": {"paths": [str(root / "data")], "max_prompt_tokens": 2048},
            # Adam's first step is ~lr * sign(grad): a small lr keeps the rounding of
            # near-zero gradients below the weight tolerance.
            "optim": {"lr": 1e-4}, **top_level}


def _comparable(record):
    """The metrics a step's numerics fix (not the padding of its micro-batch layout)."""
    return {k: v for k, v in record.items() if k not in ("time", "train/padding_fraction")
            and not k.startswith(NON_DETERMINISTIC)}


def _weights(run_dir):
    return load_file(f"{run_dir}/checkpoints/step_00000001/model/mp_rank_00_000/model.safetensors")


def test_context_parallel_step_equals_the_unsharded_step(setup):
    """KD (teacher forward on the shards too) at CP=2, fused with one sequence per
    micro-batch, materialized, and fused on packed sequences (both rows in one THD pack,
    each row cut into 2 x CP chunks of its own), against CP=1 with padded micro-batches."""
    sharded = [_config(setup, f"cp2-{impl}", "kd", CONTEXT_PARALLEL, loss_impl=impl,
                       micro_batch_size=micro, loss_chunk_tokens=5)
               for impl, micro in (("fused", 1), ("materialized", None))]
    sharded.append(_config(setup, "cp2-packed", "kd", CONTEXT_PARALLEL, loss_impl="fused",
                           pack_sequences=True, loss_chunk_tokens=5))
    reference = _config(setup, "cp1", "kd", {}, loss_impl="fused")
    assert run_distributed(train_runs, 2, args=(sharded,)) == [[0] * len(sharded)] * 2
    assert run_distributed(train_runs, 1, args=([reference],)) == [[0]]
    (expected,) = read_metrics(reference["run_dir"])
    expected = _comparable(expected)
    assert expected["loss"] > 0
    expected_weights = _weights(reference["run_dir"])
    for run in sharded:
        (got,) = read_metrics(run["run_dir"])
        got = _comparable(got)
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), (run, key)
        got_weights = _weights(run["run_dir"])
        assert got_weights.keys() == expected_weights.keys()
        for key in expected_weights:
            torch.testing.assert_close(got_weights[key], expected_weights[key], rtol=0,
                                       atol=1e-5, msg=key)


@pytest.mark.extended
@pytest.mark.vllm
def test_context_parallel_dgrpo_with_vllm_rollouts(setup):
    """dGRPO at CP=2 with a reference anchor and a YaRN student: the engine, refitted after
    each step, and the trainer's sharded forward agree on the log-probs of the sampled
    tokens; and the two steps, with padded micro-batches and with packed sequences, equal
    the same run at CP=1 (loss, metrics, weights)."""
    def config_at(name, parallel):
        config = _config(setup, name, "dgrpo", parallel, steps=2,
                         sampling={"n": 2, "max_new_tokens": 6, "temperature": 0.8},
                         rollout={"engine": "vllm", "dtype": "float32", "verify_every": 1,
                                  "verify_logprob_tol": TOLERANCE})
        config["loss"]["ref_kl_coef"] = 0.05  # reference log-probs, gathered over CP
        # YaRN in both Megatron (CP shards) and vLLM (from the exported config.json): the
        # verification compares them (vLLM caps max_model_len at original x factor = 4096).
        config["student"]["model"].update(yarn_factor=4.0,
                                          yarn_original_max_position_embeddings=1024)
        return config

    config, unsharded = config_at("cp2-dgrpo-vllm", CONTEXT_PARALLEL), config_at("cp1-dgrpo-vllm", {})
    # the same at CP=2 on packed sequences: student, teacher and reference on THD shards
    packed = {**config_at("cp2-dgrpo-vllm-packed", CONTEXT_PARALLEL), "pack_sequences": True}
    assert run_distributed(train_runs, 2, args=([config, packed],)) == [[0, 0], [0, 0]]
    assert run_distributed(train_runs, 1, args=([unsharded],)) == [[0]]
    expected_weights = load_file(f"{unsharded['run_dir']}/checkpoints/step_00000002/model/"
                                 "mp_rank_00_000/model.safetensors")
    for run in (config, packed):
        for got, expected in zip(read_metrics(run["run_dir"]),
                                 read_metrics(unsharded["run_dir"])):
            got, expected = _comparable(got), _comparable(expected)
            for key in expected:
                if not key.startswith(("verify/", "refit/")):
                    assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), \
                        (run["run_dir"], key)
        got_weights = load_file(f"{run['run_dir']}/checkpoints/step_00000002/model/"
                                "mp_rank_00_000/model.safetensors")
        for key in expected_weights:
            torch.testing.assert_close(got_weights[key], expected_weights[key], rtol=0,
                                       atol=1e-5, msg=key)
    padding = [[r["train/padding_fraction"] for r in read_metrics(run["run_dir"])]
               for run in (config, packed)]
    assert all(p < q for p, q in zip(padding[1], padding[0])), padding  # only 2 x CP alignment
    first, second = read_metrics(config["run_dir"])
    for record in (first, second):
        assert record["verify/passed"] == 1.0
        assert record["verify/max_logprob_gap"] < TOLERANCE
        assert record["response/length_mean"] > 0
    # Step 1: reference == student; step 2 samples from the refitted weights of step 1.
    assert abs(first["policy/kl_ref"]) < 1e-5
    assert second["policy/rollout_logp_gap_max"] < TOLERANCE
