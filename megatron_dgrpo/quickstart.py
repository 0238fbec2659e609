"""``dgrpo quickstart``: the CPU smoke run that needs no network and no downloaded weights.

Until the trainer lands, the quickstart exercises the foundation end to end on a tiny
random Qwen3 and reports what it checked:

1. builds the model with ``transformers`` and saves it as a sharded Hugging Face directory;
2. converts it to a Megatron checkpoint at TP=2, re-shards that to TP=1, and converts back
   to Hugging Face: every tensor must come back bit-for-bit;
3. loads the TP=2 checkpoint into a Megatron ``GPTModel`` on two real (gloo) ranks and
   compares its logits with the ``transformers`` model's, then decodes greedily with the
   embedded rollout engine and compares with ``transformers``' ``generate``.

Outputs in ``--out``: the checkpoints and ``quickstart.json`` / ``quickstart.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

_PROMPTS = [[11, 42, 7, 300, 5, 64], [901, 2, 77], [15, 15, 16, 17, 512]]
_NEW_TOKENS = 8


def add_quickstart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/quickstart",
                        help="new output directory (default: runs/quickstart)")
    parser.add_argument("--preset", default="tiny-qwen3", help="model preset (default tiny-qwen3)")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks (default 2)")
    parser.add_argument("--seed", type=int, default=0)


def _hf_model(preset: str, seed: int):
    from megatron_dgrpo.models.presets import get_preset
    from megatron_dgrpo.testing.tiny_models import random_hf_qwen3

    config = get_preset(preset)
    config.params_dtype = "fp32"
    return random_hf_qwen3(config, seed)


def _round_trip_identical(first: Path, second: Path) -> tuple[int, list[str]]:
    """(number of tensors compared, names that differ) between two HF directories."""
    from megatron_dgrpo.models.convert import HFCheckpoint

    a, b = HFCheckpoint(first), HFCheckpoint(second)
    names_a, names_b = set(a.shapes()), set(b.shapes())
    if names_a != names_b:
        return len(names_a), sorted(names_a ^ names_b)
    differing = [n for n in sorted(names_a) if not torch.equal(a.tensor(n), b.tensor(n))]
    return len(names_a), differing


def _megatron_side(rank: int, world_size: int, ckpt_dir: str, prompts, new_tokens: int):
    """On each TP rank: load the checkpoint, return (logits of prompt 0, greedy responses)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_dgrpo.models.config import ParallelConfig
    from megatron_dgrpo.models.convert import (
        MegatronCheckpoint,
        load_megatron_checkpoint_into,
    )
    from megatron_dgrpo.models.provider import build_gpt_model, initialize_parallel
    from megatron_dgrpo.rollout.embedded import EmbeddedEngine
    from megatron_dgrpo.rollout.engine import SamplingParams

    config = MegatronCheckpoint(ckpt_dir).config
    parallel = ParallelConfig(tensor_parallel=world_size)
    initialize_parallel(parallel)
    model = build_gpt_model(config, parallel)
    load_megatron_checkpoint_into(model, ckpt_dir)
    model.eval()
    with torch.no_grad():
        ids = torch.tensor([prompts[0]])
        logits = gather_from_tensor_model_parallel_region(
            model(ids, torch.arange(ids.shape[1]).unsqueeze(0), None))[0, :, :config.vocab_size]
    engine = EmbeddedEngine(model, vocab_size=config.vocab_size)
    rollouts = engine.generate(prompts, SamplingParams(temperature=0.0,
                                                       max_new_tokens=new_tokens))
    return logits.numpy(), [r.response_ids for r in rollouts.rollouts], rollouts.tokens_per_second


def run_quickstart(args: argparse.Namespace) -> int:
    from rich.console import Console

    from megatron_dgrpo.models.convert import (
        hf_to_megatron_checkpoint,
        megatron_to_hf_checkpoint,
        reshard_megatron_checkpoint,
    )
    from megatron_dgrpo.outputs import refuse_existing
    from megatron_dgrpo.testing.distributed import run_distributed

    console = Console()
    out = Path(args.out)
    refuse_existing(out)
    out.mkdir(parents=True)
    started = time.perf_counter()
    report: dict = {"preset": args.preset, "tensor_parallel": args.tp,
                    "note": "The trainer is not in this release yet: the quickstart checks the "
                            "model, conversion and rollout foundation."}

    with console.status("[bold]1/3 building a tiny random Qwen3 with transformers"):
        hf_model = _hf_model(args.preset, args.seed)
        hf_model.save_pretrained(out / "hf", max_shard_size="200KB")
    console.print(f"[green]1/3[/] Hugging Face model saved to {out / 'hf'}")

    with console.status("[bold]2/3 converting HF -> Megatron TP={} -> TP=1 -> HF".format(args.tp)):
        hf_to_megatron_checkpoint(out / "hf", out / f"megatron-tp{args.tp}", args.tp, 1)
        reshard_megatron_checkpoint(out / f"megatron-tp{args.tp}", out / "megatron-tp1", 1, 1)
        megatron_to_hf_checkpoint(out / "megatron-tp1", out / "hf-roundtrip")
        compared, differing = _round_trip_identical(out / "hf", out / "hf-roundtrip")
    report["round_trip"] = {"tensors": compared, "differing": differing}
    console.print(f"[green]2/3[/] round trip: {compared} tensors, "
                  f"{'all bit-identical' if not differing else f'DIFFERING: {differing}'}")

    with console.status(f"[bold]3/3 Megatron on {args.tp} gloo ranks vs transformers"):
        results = run_distributed(_megatron_side, args.tp,
                                  args=(str(out / f"megatron-tp{args.tp}"), _PROMPTS, _NEW_TOKENS))
        megatron_logits, megatron_greedy, tokens_per_s = results[0]
        with torch.no_grad():
            hf_logits = hf_model(torch.tensor([_PROMPTS[0]])).logits[0]
            hf_greedy = [hf_model.generate(torch.tensor([p]), max_new_tokens=_NEW_TOKENS,
                                           do_sample=False, eos_token_id=None,
                                           pad_token_id=0)[0, len(p):].tolist()
                         for p in _PROMPTS]
    max_diff = (torch.from_numpy(megatron_logits) - hf_logits).abs().max().item()
    report["logits_max_abs_diff"] = max_diff
    report["greedy_equal"] = megatron_greedy == hf_greedy
    report["embedded_engine_tokens_per_s"] = tokens_per_s
    report["seconds"] = time.perf_counter() - started
    console.print(f"[green]3/3[/] logits max |diff| {max_diff:.2e}; greedy decoding "
                  f"{'identical' if report['greedy_equal'] else 'DIFFERS'} on {len(_PROMPTS)} prompts")

    ok = not differing and max_diff < 1e-4 and report["greedy_equal"]
    report["ok"] = ok
    (out / "quickstart.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "quickstart.md").write_text(
        "# dgrpo quickstart\n\n"
        f"- model: `{args.preset}` (random weights), Megatron TP={args.tp} on CPU/gloo\n"
        f"- HF -> Megatron -> HF: {compared} tensors, "
        f"{'bit-identical' if not differing else 'differing: ' + ', '.join(differing)}\n"
        f"- logits vs transformers: max abs diff {max_diff:.2e}\n"
        f"- greedy decoding (embedded engine vs transformers): "
        f"{'identical' if report['greedy_equal'] else 'different'}\n"
        f"- wall time: {report['seconds']:.1f} s\n\n{report['note']}\n")
    console.print(f"{'[bold green]OK' if ok else '[bold red]FAILED'}[/] in "
                  f"{report['seconds']:.1f} s; report: {out / 'quickstart.md'}")
    return 0 if ok else 1
