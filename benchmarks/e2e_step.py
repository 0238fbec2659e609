"""End-to-end GRPO/dGRPO step on CPU: our trainer vs TRL's ``GRPOTrainer`` on the same work.

One workload for every run: random Qwen3 models (fp32, built with ``transformers`` and
converted to Megatron with the project's converter, so both sides start from the same
weights), synthetic LongBlocks tasks and a trained tokenizer, the same prompts as token ids in
the same order, G completions per prompt of exactly ``--new-tokens`` tokens each (no stop
token on our side, ``min_new_tokens`` on TRL's), one optimizer step per rollout batch, Adam at
a constant learning rate, no gradient clipping. ``--workload`` picks the shapes:

- ``tiny`` (default): the CPU quickstart's step as it was when the table in the README was
  measured (the quickstart has since moved to shipped 4-layer models on 512-token documents):
  student ``tiny-qwen3``, teacher ``small-qwen3``, documents of five task families at a
  64-token target (about 120 tokens measured with the tokenizer), 8 prompts x G=4 x 12 new tokens;
- ``13m``: a 13M-parameter Qwen3 (student and teacher), 256-token documents, 2 prompts x G=4
  x 32 new tokens: fewer, longer sequences through a model where the matrix products dominate;
- ``long``: the same 13M-parameter models on prompts of >= 2K tokens (1728-token documents),
  1 prompt x G=4 x 64 new tokens: the long-context case this project is for.

Runs, each in a fresh process (so peak memory is its own):

- ours, GRPO with ``kl_coef=0`` (no reference model) through ``Trainer.train_step``;
- TRL, ``GRPOTrainer`` with ``beta=0`` and the matching loss (``benchmarks/trl_step.py``,
  run in ``.venv-bench`` from ``tools/install_bench.sh``; skipped with a note if absent);
- ours, dGRPO with a teacher of the student's size (TRL has no teacher-guided objective, so
  this row is compared with TRL's GRPO: the same rollouts and update, plus the teacher's
  forward and the full-vocabulary KL);
- with ``--async``, ours, GRPO with the vLLM engine in a process of its own sampling the next
  batch during each step (``rollout.async_mode: one_step``; the warm-up step samples
  synchronously). Engine and trainer share the same CPUs; the CPU seconds of this row are
  the trainer's only (the engine's process is not counted), so its per-CPU-second ratio is
  not comparable and is not printed.

Each run does one warm-up step, then ``--steps`` measured steps, with ``--threads`` torch
threads (ours: split over ``--tp`` ranks). Reported per run: median seconds per step (the
wall time of the whole step), split into rollout (sampling; ours also scores rewards here,
TRL in its scoring phase, both negligible), scoring (what is computed before the loss: our
old log-probs and teacher logits; TRL, with one optimizer step per batch, computes no
log-probs here) and training (forward, loss, backward, optimizer step); median tokens/s,
where a step's tokens = generated tokens + tokens of the training sequences (prompt +
completion, no padding), identical on both sides by construction; CPU seconds per step (all
threads, summed over ranks) and tokens per CPU second; and peak RSS (MiB, of the whole
process, summed over ranks). Targets: our GRPO >= 1.5x TRL's tokens/s, our dGRPO >= 1.2x
TRL's GRPO tokens/s. The runs are sequential, so other jobs on the machine skew the wall-time
ratio: the load average at the end of each run is printed, the CPU-time ratio beside it, and
``--repeats N`` runs the three N times in turn on the same assets, so that the ratios of each
round are measured side by side and their median and spread are printed (``--json``: every
row and ratio to a file).

    tools/install_bench.sh                        # once: TRL in .venv-bench
    .venv/bin/python benchmarks/e2e_step.py       # a few minutes on an idle 2-core machine
    .venv/bin/python benchmarks/e2e_step.py --workload 13m --tp 2 --steps 5
    .venv/bin/python benchmarks/e2e_step.py --workload long --repeats 3 --json long.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from trl_step import answer_length_parity  # stdlib-only module beside this one

from megatron_dgrpo.models.config import ModelConfig
from megatron_dgrpo.models.presets import get_preset

REPO = Path(__file__).resolve().parents[1]
BENCH_PYTHON = REPO / ".venv-bench" / "bin" / "python"
# Targets (tokens/s): our GRPO over TRL's GRPO, our dGRPO over TRL's GRPO.
TARGETS = {"GRPO": 1.5, "dGRPO": 1.2, "GRPO async": 2.0}
REWARD_NAME = "bench_answer_length_parity"


@dataclass(frozen=True)
class Workload:
    """Models and step shape of one benchmark workload (prompts per step, G, new tokens)."""

    student: ModelConfig
    teacher: ModelConfig
    prompts: int
    group: int
    new_tokens: int
    document_tokens: int
    tasks: str | None = None  # `dgrpo data synth --tasks` (None: all of them)
    hops: str | None = None  # `dgrpo data synth --hops` (None: its default)
    measured_lengths: bool = False  # documents measured with the tokenizer (else approximated)
    min_prompt_tokens: int = 1  # the run refuses data with a shorter prompt


# ~13M parameters; vocabulary 1024 = the quickstart tokenizer's.
MODEL_13M = ModelConfig(num_layers=4, hidden_size=512, ffn_hidden_size=1536,
                        num_attention_heads=8, num_query_groups=4, head_dim=64,
                        vocab_size=1024, max_position_embeddings=4096,
                        tie_word_embeddings=True, params_dtype="fp32")
WORKLOADS = {
    # The CPU quickstart's dGRPO step before it moved to shipped 4-layer models on 512-token
    # documents: tiny-qwen3 student, small-qwen3 teacher, five task families at a 64-token
    # target.
    "tiny": Workload(get_preset("tiny-qwen3"), get_preset("small-qwen3"), prompts=8, group=4,
                     new_tokens=12, document_tokens=64, hops="1", measured_lengths=True,
                     tasks="multihop,counterfactual,unanswerable,count_items,section_lookup"),
    "13m": Workload(MODEL_13M, MODEL_13M, prompts=2, group=4, new_tokens=32, document_tokens=256),
    "long": Workload(MODEL_13M, MODEL_13M, prompts=1, group=4, new_tokens=64,
                     document_tokens=1728, min_prompt_tokens=2048),
}


# ---------------------------------------------------------------- workload


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that define the work of a run (also read by ``e2e_profile.py``)."""
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="tiny")
    parser.add_argument("--steps", type=int, default=3, help="measured steps after 1 warm-up")
    parser.add_argument("--prompts", type=int, help="prompts per step (default: the workload's)")
    parser.add_argument("--group", type=int,
                        help="completions per prompt, G (default: the workload's)")
    parser.add_argument("--new-tokens", type=int,
                        help="tokens per completion (default: the workload's)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads per run (ours: split over the TP ranks)")
    parser.add_argument("--tp", type=int, default=1, help="our tensor-parallel size (ranks)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)


def resolve_workload(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the workload's prompts, G and new tokens where not given."""
    workload = WORKLOADS[args.workload]
    args.prompts = args.prompts or workload.prompts
    args.group = args.group or workload.group
    args.new_tokens = args.new_tokens or workload.new_tokens
    return args


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(parser)
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of the three runs on the same assets")
    parser.add_argument("--json", help="write every round's rows and ratios to this file")
    parser.add_argument("--async", dest="async_grpo", action="store_true",
                        help="add our GRPO with asynchronous vLLM rollouts (one_step)")
    return resolve_workload(parser.parse_args())


def prepare_assets(root: Path, args: argparse.Namespace) -> dict[str, str]:
    """Tokenizer, data, HF student/teacher and their Megatron checkpoints under ``root``;
    returns their paths by name."""
    from megatron_dgrpo.cli import main as dgrpo
    from megatron_dgrpo.testing.tiny_models import write_random_qwen3

    workload = WORKLOADS[args.workload]
    paths = {name: str(root / name) for name in ("student_hf", "teacher_hf", "student", "teacher")}
    num_prompts = args.prompts * (args.steps + 1) + 4  # spare: ~1% of rows are validation
    paths.update(tokenizer=str(root / "tokenizer"), data=str(root / "data"))
    synth = ["data", "synth", "--out", paths["data"], "--num", str(num_prompts),
             "--lengths", str(workload.document_tokens), "--seed", str(args.seed)]
    synth += ["--tokenizer", paths["tokenizer"]] if workload.measured_lengths else []
    synth += ["--tasks", workload.tasks] if workload.tasks else []
    synth += ["--hops", workload.hops] if workload.hops else []
    commands = (["data", "tokenizer", "--out", paths["tokenizer"],
                 "--vocab-size", str(workload.student.vocab_size)], synth)
    for command in commands:
        if dgrpo(command) != 0:
            raise RuntimeError(f"dgrpo {' '.join(command)} failed")
    for role, seed in (("student", args.seed), ("teacher", args.seed + 1)):
        model = getattr(workload, role)
        write_random_qwen3(model, paths[f"{role}_hf"], paths[role], seed, weight_scale=1.0)
    return paths


def step_prompts(paths: dict[str, str], args: argparse.Namespace) -> list[list[int]]:
    """Prompt token ids of every step (warm-up first), in the order our trainer takes them."""
    from megatron_dgrpo.data.chat import load_chat_tokenizer
    from megatron_dgrpo.data.longblocks import LongBlocksConfig, LongBlocksLoader

    loader = LongBlocksLoader(LongBlocksConfig(paths=[paths["data"]]),
                              load_chat_tokenizer(paths["tokenizer"]))
    prompts = [example.prompt_ids for example in loader]
    needed = args.prompts * (args.steps + 1)
    if len(prompts) < needed:
        raise RuntimeError(f"the data has {len(prompts)} usable prompts, the run needs {needed}")
    shortest, wanted = min(map(len, prompts[:needed])), WORKLOADS[args.workload].min_prompt_tokens
    if shortest < wanted:
        raise RuntimeError(f"a prompt of {shortest} tokens; workload {args.workload} needs "
                           f">= {wanted}")
    return prompts[:needed]


def step_tokens(prompts: list[list[int]], args: argparse.Namespace) -> list[int]:
    """Tokens of each step: generated (G x new tokens per prompt) + training sequences
    (prompt + completion per completion)."""
    per_step = [prompts[i:i + args.prompts] for i in range(0, len(prompts), args.prompts)]
    return [sum(args.group * (2 * args.new_tokens + len(p)) for p in step) for step in per_step]


def run_config(paths: dict[str, str], args: argparse.Namespace, objective: str,
               run_dir: str) -> dict:
    """Our RunConfig (as a dict) for ``objective`` on the shared workload."""
    config = {
        "run_dir": run_dir, "seed": args.seed, "steps": args.steps + 1,
        "prompts_per_step": args.prompts, "tokenizer": paths["tokenizer"],
        "parallel": {"tensor_parallel": args.tp},
        "student": {"preset": None, "init_from": paths["student"]},
        "loss": {"objective": objective, "kl_coef": 0.0 if objective == "grpo" else 0.04},
        "sampling": {"n": args.group, "max_new_tokens": args.new_tokens, "temperature": 1.0},
        "data": {"paths": [paths["data"]]},
        "rewards": {"per_task": {}, "default": REWARD_NAME},
        "optim": {"lr": args.lr, "clip_grad": 0.0},
    }
    if objective == "dgrpo":
        config["teacher"] = {"preset": None, "init_from": paths["teacher"]}
    return config


def vllm_config(paths: dict[str, str], args: argparse.Namespace, run_dir: str,
                async_mode: str = "one_step") -> dict:
    """Our GRPO config with vLLM rollouts in ``async_mode`` (default: sampling one step
    ahead)."""
    config = run_config(paths, args, "grpo", run_dir)
    config["rollout"] = {"engine": "vllm", "dtype": "float32", "async_mode": async_mode,
                         "verify_every": 0}
    positions = WORKLOADS[args.workload].student.max_position_embeddings
    config["data"]["max_prompt_tokens"] = positions - args.new_tokens  # vLLM's context bound
    return config


# ---------------------------------------------------------------- the two sides


def ours_worker(rank: int, world_size: int, config_dict: dict, threads: int) -> dict:
    """Build our Trainer and run every step (on each rank of ``run_distributed``); returns
    per-step records (wall and CPU seconds, generated tokens) and this rank's peak RSS (MiB)."""
    from megatron_dgrpo.config import from_dict
    from megatron_dgrpo.data.rewards import register_reward
    from megatron_dgrpo.train.config import RunConfig
    from megatron_dgrpo.train.loop import Trainer

    torch.set_num_threads(max(1, threads // world_size))
    register_reward(REWARD_NAME)(answer_length_parity)
    config = from_dict(RunConfig, config_dict)  # validated here
    trainer = Trainer(config)
    records = []
    for _ in range(config.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        metrics = trainer.train_step()
        records.append({"step_s": time.perf_counter() - start,
                        "cpu_s": time.process_time() - cpu_start,
                        "rollout_s": metrics["time/rollout_s"],
                        "scoring_s": metrics["time/scoring_s"],
                        "train_s": metrics["time/train_s"],
                        "generated_tokens": round(metrics["response/length_mean"]
                                                  * config.prompts_per_step * config.sampling.n)})
    return {"steps": records,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_ours(config_dict: dict, args: argparse.Namespace) -> dict:
    """Our run on ``args.tp`` fresh processes; rank 0's records with CPU seconds and peak RSS
    summed over ranks."""
    from megatron_dgrpo.parallel.launch import run_distributed

    results = run_distributed(ours_worker, args.tp, args=(config_dict, args.threads))
    steps = [{**step, "cpu_s": sum(r["steps"][i]["cpu_s"] for r in results)}
             for i, step in enumerate(results[0]["steps"])]
    return {"steps": steps, "peak_rss_mib": sum(r["peak_rss_mib"] for r in results)}


def run_trl(workload: dict, root: Path) -> dict | None:
    """TRL's run in ``.venv-bench`` (None when that environment is missing)."""
    if not BENCH_PYTHON.exists():
        return None
    workload_path, result_path = root / "workload.json", root / "trl_result.json"
    workload_path.write_text(json.dumps(workload))
    subprocess.run([str(BENCH_PYTHON), str(Path(__file__).with_name("trl_step.py")),
                    "--workload", str(workload_path), "--out", str(result_path)], check=True)
    result = json.loads(result_path.read_text())
    per_step, group = workload["prompts_per_step"], workload["group"]
    prompts = workload["prompt_ids"]
    expected = [group * sum(map(len, prompts[i:i + per_step]))
                for i in range(0, len(prompts), per_step)]
    if [step["prompt_tokens"] for step in result["steps"]] != expected:
        raise RuntimeError("TRL's steps did not take the prompts in our order")
    return result


# ---------------------------------------------------------------- report


def summarize(result: dict, tokens: list[int], expected_generated: int) -> dict[str, float]:
    """Medians over the measured steps (the first step is the warm-up), the run's peak RSS and
    the 1-minute load average when it ended."""
    steps = result["steps"]
    if len(steps) != len(tokens):
        raise RuntimeError(f"{len(steps)} steps recorded, {len(tokens)} expected")
    wrong = [s["generated_tokens"] for s in steps if s["generated_tokens"] != expected_generated]
    if wrong:
        raise RuntimeError(f"steps generated {wrong} tokens, not {expected_generated}: "
                           "the sides would not do the same work")
    measured = list(zip(steps, tokens))[1:]
    row = {key: statistics.median(s[key] for s, _ in measured)
           for key in ("rollout_s", "scoring_s", "train_s", "step_s", "cpu_s")}
    row["tokens_per_step"] = statistics.median(t for _, t in measured)
    row["tokens_per_s"] = statistics.median(t / s["step_s"] for s, t in measured)
    row["peak_rss_mib"] = result["peak_rss_mib"]
    row["load"] = os.getloadavg()[0]
    return row


def format_row(name: str, r: dict[str, float]) -> str:
    return (f"| {name} | {r['rollout_s']:.2f} | {r['scoring_s']:.2f} | {r['train_s']:.2f} "
            f"| {r['step_s']:.2f} | {r['cpu_s']:.2f} | {r['tokens_per_step']:.0f} "
            f"| {r['tokens_per_s']:.0f} | {r['tokens_per_step'] / r['cpu_s']:.0f} "
            f"| {r['peak_rss_mib']:.0f} | {r['load']:.1f} |")


def print_table(rows: dict[str, dict[str, float]]) -> None:
    print("| run | rollout s | scoring s | train s | step s | CPU s | tokens/step | tokens/s "
          "| tokens/CPU s | peak RSS MiB | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(format_row(name, row))


def run_all(args: argparse.Namespace, root: Path) -> list[dict[str, dict[str, float]]]:
    """``args.repeats`` rounds of every run on one workload under ``root`` (assets made once);
    per round, rows by run name, each printed when done."""
    from megatron_dgrpo.models.mapping import hf_shapes

    paths = prepare_assets(root, args)
    prompts = step_prompts(paths, args)
    tokens = step_tokens(prompts, args)
    expected = args.prompts * args.group * args.new_tokens
    student, teacher = (sum(torch.Size(s).numel() for s in hf_shapes(model).values())
                        for model in (WORKLOADS[args.workload].student,
                                      WORKLOADS[args.workload].teacher))
    print(f"workload {args.workload}: Qwen3 student {student / 1e6:.2f}M parameters, teacher "
          f"{teacher / 1e6:.2f}M (dGRPO only), fp32; {args.prompts} prompts "
          f"x G={args.group} x {args.new_tokens} new tokens per step, prompts of "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens; 1 warm-up + "
          f"{args.steps} measured steps; {args.threads} torch threads per run; ours at "
          f"TP={args.tp}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
          flush=True)
    runs = {
        RUN_NAMES["ours_grpo"]: lambda: run_ours(
            run_config(paths, args, "grpo", str(root / "grpo")), args),
        RUN_NAMES["trl_grpo"]: lambda: run_trl(
            {"hf_model": paths["student_hf"], "tokenizer": paths["tokenizer"],
             "prompt_ids": prompts, "prompts_per_step": args.prompts, "group": args.group,
             "max_new_tokens": args.new_tokens, "steps": args.steps + 1, "lr": args.lr,
             "seed": args.seed, "threads": args.threads}, root),
        RUN_NAMES["ours_dgrpo"]: lambda: run_ours(
            run_config(paths, args, "dgrpo", str(root / "dgrpo")), args),
    }
    if args.async_grpo:
        runs[RUN_NAMES["ours_grpo_async"]] = lambda: run_ours(
            vllm_config(paths, args, str(root / "grpo")), args)
    rounds = []
    for round_index in range(args.repeats):
        rows = {}
        for name, run in runs.items():
            shutil.rmtree(root / "grpo", ignore_errors=True)
            shutil.rmtree(root / "dgrpo", ignore_errors=True)
            result = run()
            if result is None:
                print(f"{name}: skipped, {BENCH_PYTHON} not found (run tools/install_bench.sh)")
                continue
            rows[name] = summarize(result, tokens, expected)
            print(f"round {round_index + 1}: {format_row(name, rows[name])}", flush=True)
        rounds.append(rows)
    return rounds


RUN_NAMES = {"ours_grpo": "ours GRPO", "trl_grpo": "TRL GRPOTrainer GRPO",
             "ours_dgrpo": "ours dGRPO", "ours_grpo_async": "ours GRPO async (vLLM, one_step)"}


def round_ratios(rows: dict[str, dict[str, float]]) -> dict[str, float]:
    """Ours over TRL's GRPO in one round: tokens/s (``GRPO``, ``dGRPO``) and tokens per CPU
    second (``GRPO per CPU s``, ``dGRPO per CPU s``); empty without the TRL run."""
    trl = rows.get(RUN_NAMES["trl_grpo"])
    if trl is None:
        return {}
    ratios = {}
    for objective, key in (("GRPO", "ours_grpo"), ("dGRPO", "ours_dgrpo")):
        ours = rows[RUN_NAMES[key]]
        ratios[objective] = ours["tokens_per_s"] / trl["tokens_per_s"]
        ratios[f"{objective} per CPU s"] = ((ours["tokens_per_step"] / ours["cpu_s"])
                                            / (trl["tokens_per_step"] / trl["cpu_s"]))
    async_row = rows.get(RUN_NAMES["ours_grpo_async"])
    if async_row is not None:
        ratios["GRPO async"] = async_row["tokens_per_s"] / trl["tokens_per_s"]
    return ratios


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="e2e_step_") as tmp:
        rounds = run_all(args, Path(tmp))
    ratios = [round_ratios(rows) for rows in rounds]
    for index, rows in enumerate(rounds):
        print(f"\nround {index + 1}:")
        print_table(rows)
        print("ours / TRL GRPO: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios[index].items()))
    if ratios[0]:
        print(f"\nover {len(rounds)} round(s) (wall times are skewed when the load average "
              "exceeds the CPU count; per CPU second is less sensitive, OpenMP spin-waits "
              "still count):")
        for key in ratios[0]:
            values = sorted(r[key] for r in ratios)
            median = statistics.median(values)
            line = (f"  ours/TRL {key}: median {median:.2f}x "
                    f"(min {values[0]:.2f}, max {values[-1]:.2f})")
            if key in TARGETS:
                verdict = "met" if median >= TARGETS[key] else "NOT met"
                line += f"; target >= {TARGETS[key]}x: {verdict}"
            print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"workload": args.workload, "args": vars(args), "rounds": rounds,
             "ratios": ratios}, indent=1) + "\n")


if __name__ == "__main__":
    main()
