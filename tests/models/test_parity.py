"""Megatron GPTModel logits match transformers' Qwen3ForCausalLM at TP/PP layouts (real ranks).

One 4-rank gloo run covers TP=1, TP=2, PP=2 and TP=2 x PP=2 for tied and untied embeddings:
the model-parallel groups are rebuilt per layout in the same processes (spawning and
importing Megatron is the slow part). Smaller layouts run with data-parallel replicas.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hf_tiny_models import (
    TEST_VOCAB,
    build_hf_model,
    read_json,
    save_hf_dir,
    tiny_config,
)
from safetensors.torch import load_file

from megatron_dgrpo.models import convert
from megatron_dgrpo.models.config import ParallelConfig
from megatron_dgrpo.parallel.launch import run_distributed

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]  # (tensor_parallel, pipeline_parallel)
BATCH, SEQ = 2, 16
SAVED_LAYOUT = (2, 2)


def _input_ids() -> torch.Tensor:
    return torch.randint(0, TEST_VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))


def _megatron_logits(model, input_ids: torch.Tensor):
    """Full-vocabulary logits [b, s, padded_vocab] on the last stage's TP rank 0, else None."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    position_ids = torch.arange(SEQ).expand(BATCH, SEQ)

    def forward_step(_data_iterator, module):
        logits = module(input_ids, position_ids, None)

        def keep_logits(output):
            return output.sum() * 0.0, {"logits": output.detach()}

        return logits, keep_logits

    results = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
        num_microbatches=1, seq_length=SEQ, micro_batch_size=BATCH, forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    local = results[0]["logits"]                     # [b, s, padded_vocab / tp]
    shards = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(shards, local, group=ps.get_tensor_model_parallel_group())
    reporting = (ps.get_tensor_model_parallel_rank() == 0
                 and ps.get_data_parallel_rank(with_context_parallel=True) == 0)
    return torch.cat(shards, dim=-1) if reporting else None


def _provider_misuse_errors() -> dict[str, str]:
    """Messages of the provider's refusals (run before the first layout is initialised)."""
    from megatron_dgrpo.models.provider import build_gpt_model, initialize_parallel

    errors = {}
    try:
        build_gpt_model(tiny_config(True), ParallelConfig())
    except RuntimeError as exc:
        errors["build before initialize"] = str(exc)
    try:
        initialize_parallel(ParallelConfig(tensor_parallel=3))
    except ValueError as exc:
        errors["world size"] = str(exc)
    return errors


def _run_layouts(rank, world_size, checkpoints, saved_dir):
    """Every layout x tying on 4 ranks.

    Returns ``{"logits": {(tp, pp, tied): logits}, "errors": {check: message}}``; logits
    come only from the rank that holds them (last stage, TP rank 0, first replica).
    """
    from megatron_dgrpo.models.convert import (
        load_megatron_checkpoint_into,
        save_megatron_model,
    )
    from megatron_dgrpo.models.provider import (
        build_gpt_model,
        destroy_parallel,
        initialize_parallel,
    )

    torch.set_num_threads(1)
    errors = _provider_misuse_errors()
    logits = {}
    for tp, pp in LAYOUTS:
        parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
        initialize_parallel(parallel, seed=1234)
        if (tp, pp) == (1, 1):
            try:
                build_gpt_model(tiny_config(True), ParallelConfig(tensor_parallel=2))
            except ValueError as exc:
                errors["layout mismatch"] = str(exc)
        for tied in (True, False):
            config = tiny_config(tied)
            model = build_gpt_model(config, parallel).eval()
            load_megatron_checkpoint_into(model, checkpoints[(tied, tp, pp)])
            with torch.no_grad():
                out = _megatron_logits(model, _input_ids())
            if out is not None:
                logits[(tp, pp, tied)] = out
            if (tp, pp) == SAVED_LAYOUT:
                save_megatron_model(model, config, saved_dir / f"tied_{tied}")
        destroy_parallel()
    return {"logits": logits, "errors": errors}


@dataclass
class ParityRun:
    """Inputs and results of the one 4-rank run shared by the tests below."""

    root: Path
    hf_logits: dict[bool, torch.Tensor]                       # tied -> [b, s, vocab]
    megatron_logits: dict[tuple[int, int, bool], torch.Tensor]  # (tp, pp, tied) -> [b, s, pv]
    errors_per_rank: list[dict[str, str]]


@pytest.fixture(scope="module")
def parity_run(tmp_path_factory) -> ParityRun:
    root = tmp_path_factory.mktemp("parity")
    hf_logits, checkpoints = {}, {}
    for tied in (True, False):
        hf_model = build_hf_model(tiny_config(tied), seed=20 + tied)
        with torch.no_grad():
            hf_logits[tied] = hf_model(_input_ids()).logits
        hf_dir = save_hf_dir(hf_model, root / f"hf_{tied}")
        # Tied: a checkpoint converted at each layout. Untied: the TP=1/PP=1 checkpoint,
        # which the loader re-shards to every layout.
        for tp, pp in LAYOUTS:
            checkpoints[(tied, tp, pp)] = convert.hf_to_megatron_checkpoint(
                hf_dir, root / f"mcore_{tied}_tp{tp}_pp{pp}", tp, pp)
        if not tied:
            checkpoints.update({(tied, tp, pp): checkpoints[(tied, 1, 1)] for tp, pp in LAYOUTS})

    per_rank = run_distributed(_run_layouts, world_size=4, args=(checkpoints, root / "saved"))
    return ParityRun(root, hf_logits,
                     {key: value for result in per_rank for key, value in result["logits"].items()},
                     [result["errors"] for result in per_rank])


@pytest.mark.multiproc
def test_megatron_logits_match_transformers_at_every_layout(parity_run):
    assert sorted(parity_run.megatron_logits) == sorted(
        (tp, pp, tied) for tp, pp in LAYOUTS for tied in (True, False))
    for (tp, pp, tied), logits in parity_run.megatron_logits.items():
        reference = parity_run.hf_logits[tied]
        assert logits.shape == (BATCH, SEQ, tiny_config(tied).padded_vocab_size(tp))
        assert reference.abs().max() > 0.5, "logits too small for a meaningful comparison"
        diff = (logits[..., :TEST_VOCAB] - reference).abs().max().item()
        assert diff <= 1e-5, f"TP={tp} PP={pp} tied={tied}: max |logit diff| {diff:.2e}"


@pytest.mark.multiproc
def test_saving_live_ranks_writes_what_the_converter_writes(parity_run):
    tp, pp = SAVED_LAYOUT
    for tied in (True, False):
        saved = parity_run.root / "saved" / f"tied_{tied}"
        converted = parity_run.root / f"mcore_{tied}_tp{tp}_pp{pp}"
        for tp_rank in range(tp):
            for pp_rank in range(pp):
                name = f"{convert.shard_dir_name(tp_rank, pp_rank)}/model.safetensors"
                ours, reference = load_file(saved / name), load_file(converted / name)
                assert sorted(ours) == sorted(reference)
                for key in reference:
                    assert torch.equal(ours[key], reference[key]), (tied, name, key)
        meta = read_json(saved / convert.METADATA_FILE)
        assert meta == {**read_json(converted / convert.METADATA_FILE), "hf_config": None}


@pytest.mark.multiproc
def test_provider_refuses_misuse_with_clear_messages(parity_run):
    for errors in parity_run.errors_per_rank:
        assert "call initialize_parallel" in errors["build before initialize"]
        assert "world size 4 is not a multiple of TP x PP x CP = 3" in errors["world size"]
        assert "do not match parallel config (TP=2" in errors["layout mismatch"]
