"""Training-step time with packed sequences (``pack_sequences``, THD) vs right-padded rows.

One workload, both layouts in the same process one after the other: SFT of a random Qwen3
(fp32, 4 layers, hidden 256) on synthetic multi-hop tasks whose prompts cycle through
``--lengths`` (so every step's batch mixes them), ``--prompts`` rows per step as one
micro-batch: padded, ``[rows, longest]`` positions; packed, one ``[1, sum of lengths]``
row with attention within each sequence. Each run does one warm-up step, then
``--steps`` measured ones; reported per layout: the median ``time/train_s`` (the student's
forward, loss, backward and optimizer step; the batch is built before it), the
``train/padding_fraction`` of its forward, and the ratio padded / packed. No assertion:
other jobs on the machine skew wall times, so the load average is printed too.

    .venv/bin/python benchmarks/packing.py                       # ~2 minutes on 2 idle cores
    .venv/bin/python benchmarks/packing.py --lengths 256,2k --prompts 4 --steps 5
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
from pathlib import Path

from megatron_dgrpo.models.config import ModelConfig

MODEL = ModelConfig(num_layers=4, hidden_size=256, ffn_hidden_size=768, num_attention_heads=4,
                    num_query_groups=2, head_dim=64, vocab_size=1024,
                    max_position_embeddings=8192, tie_word_embeddings=True, params_dtype="fp32")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="256,512,1k,2k",
                        help="document lengths the prompts cycle through (dgrpo data synth)")
    parser.add_argument("--prompts", type=int, default=8, help="rows per step")
    parser.add_argument("--steps", type=int, default=3, help="measured steps after 1 warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def prepare(root: Path, args: argparse.Namespace) -> dict[str, str]:
    """Tokenizer, data and the student checkpoint under ``root``; their paths by name."""
    from megatron_dgrpo.cli import main as dgrpo
    from megatron_dgrpo.testing.tiny_models import write_random_qwen3

    paths = {name: str(root / name) for name in ("tokenizer", "data", "student_hf", "student")}
    rows = args.prompts * (args.steps + 1) + 8  # spare: ~1% of rows are validation
    for command in (["data", "tokenizer", "--out", paths["tokenizer"],
                     "--vocab-size", str(MODEL.vocab_size)],
                    ["data", "synth", "--out", paths["data"], "--num", str(rows),
                     "--lengths", args.lengths, "--tasks", "multihop", "--seed", str(args.seed)]):
        if dgrpo(command) != 0:
            raise RuntimeError(f"dgrpo {' '.join(command)} failed")
    write_random_qwen3(MODEL, paths["student_hf"], paths["student"], args.seed, weight_scale=1.0)
    return paths


def run_config(paths: dict[str, str], args: argparse.Namespace, run_dir: str,
               packed: bool) -> dict:
    return {"run_dir": run_dir, "seed": args.seed, "steps": args.steps + 1,
            "save_every": args.steps + 1, "prompts_per_step": args.prompts,
            "tokenizer": paths["tokenizer"],
            "student": {"preset": None, "init_from": paths["student"]},
            "loss": {"objective": "sft"}, "pack_sequences": packed,
            "data": {"paths": [paths["data"]], "max_prompt_tokens": 8192},
            "optim": {"lr": 1e-5}}


def worker(rank: int, world_size: int, configs: list[dict], threads: int) -> list[int]:
    import torch

    from megatron_dgrpo.testing.runs import train_runs

    torch.set_num_threads(threads)
    return train_runs(rank, world_size, configs)


def main() -> None:
    from megatron_dgrpo.parallel.launch import run_distributed
    from megatron_dgrpo.train.metrics import read_metrics

    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="dgrpo-packing-") as tmp:
        root = Path(tmp)
        paths = prepare(root, args)
        configs = {layout: run_config(paths, args, str(root / layout), layout == "packed")
                   for layout in ("padded", "packed")}
        assert run_distributed(worker, 1, args=(list(configs.values()), args.threads)) == [[0, 0]]
        results = {}
        for layout, config in configs.items():
            measured = read_metrics(config["run_dir"])[1:]
            results[layout] = (statistics.median(r["time/train_s"] for r in measured),
                               statistics.mean(r["train/padding_fraction"] for r in measured),
                               measured[0]["loss"])
    print(f"workload: SFT, {dataclasses.asdict(MODEL)['num_layers']} layers x hidden "
          f"{MODEL.hidden_size}, {args.prompts} rows per step cycling document lengths "
          f"{args.lengths}, {args.steps} measured steps, {args.threads} threads")
    print(f"{'layout':8s} {'train s/step (median)':>22s} {'padding fraction':>17s} "
          f"{'step-2 loss':>12s}")
    for layout, (seconds, padding, loss) in results.items():
        print(f"{layout:8s} {seconds:22.3f} {padding:17.3f} {loss:12.6f}")
    print(f"padded / packed training-step time: "
          f"{results['padded'][0] / results['packed'][0]:.2f}x")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
