"""``dgrpo experiment``: the paper in miniature, on CPU. SFT, KD, GRPO, OPD and dGRPO from the
same cold-started student, against the same teacher, on the same prompts and budget, over
several seeds; the paper's ablations as options; a report that says whether the paper's
ordering held.

    dgrpo experiment --out runs/experiment [--seeds 0,1,2] [--ablations beta,mix,anchor,cold]
                     [--teacher CKPT] [--short] [--jobs 2]

Phases (each an ordinary ``dgrpo`` command with a generated config, see
:mod:`megatron_dgrpo.recipe`):

1. assets: a tokenizer, training tasks at ``document_tokens``, held-out tasks at that length
   and at twice it (``long`` / ``longer``), and a short-context set (the same task families
   over ``short_tokens`` documents) with its own training split for the mixing ablation;
2. the teacher: ``--teacher`` (a Megatron checkpoint), or an SFT run of ``teacher_preset``;
   its greedy responses to the training prompts (``dgrpo data teacher-responses``), what
   the off-policy baselines train on;
3. per seed, the cold start: SFT of the student for ``cold_start_steps``;
4. per seed and method, ``method_steps`` optimizer steps from the cold start, every method
   seeing ``prompts_per_step x group_size`` sequences per step (rollouts on-policy, teacher
   responses or reference answers off-policy):

   ==================  ==============================================================
   ``sft``             SFT on the teacher's responses (the paper's off-policy baseline)
   ``sft_reference``   SFT on the reference answers
   ``kd``              forward KL to the teacher on the teacher's responses (full vocab)
   ``grpo``            GRPO, KL to the frozen cold start (``grpo_kl_coef``)
   ``opd``             on-policy reverse KL to the teacher, no reward
   ``dgrpo``           GRPO with the teacher as the KL anchor (``dgrpo_kl_coef``)
   ==================  ==============================================================

5. evaluation: greedy answers of every final student on the three held-out sets beside the
   no-context baseline (fitted on the training tasks), per family and needle depth;
6. ``report.md``, ``experiment.json`` and PNGs: mean +- std over seeds, learning curves
   from the runs' metrics, and a paragraph on whether the paper's ordering held.

Ablations (``--ablations``), dGRPO variants over the same seeds: ``beta`` (teacher-KL weight
0, 0.04, 0.5, 1.0), ``mix`` (long-context token share 0.5, 0.9, 1.0 with the short set
mixed in), ``anchor`` (KL to the reference, to the teacher, to both), ``cold`` (no cold
start: dGRPO from the random initialisation).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_dgrpo.config import deep_merge

OFF_POLICY_TARGET = "response_teacher"  # the column `dgrpo data teacher-responses` writes


@dataclass(frozen=True)
class ExperimentPlan:
    """Sizes of one experiment; :data:`FULL` is the documented run, :data:`SHORT` the test."""

    vocab_size: int
    document_tokens: int
    short_tokens: int
    tasks: tuple[str, ...]
    train_examples: int
    short_train_examples: int
    heldout_examples: int
    teacher_preset: str
    teacher_steps: int  # SFT steps when no --teacher is given
    student_preset: str
    cold_start_steps: int
    method_steps: int
    prompts_per_step: int
    group_size: int
    temperature: float
    max_new_tokens: int
    sft_lr: float
    rl_lr: float
    grpo_kl_coef: float
    dgrpo_kl_coef: float


FULL = ExperimentPlan(
    vocab_size=2048, document_tokens=256, short_tokens=64,
    tasks=("multihop", "counterfactual", "unanswerable", "count_items", "section_lookup"),
    train_examples=6000, short_train_examples=2000, heldout_examples=96,
    teacher_preset="small-qwen3", teacher_steps=400, student_preset="tiny-qwen3",
    cold_start_steps=60, method_steps=60, prompts_per_step=8, group_size=4, temperature=0.6,
    max_new_tokens=12, sft_lr=3e-3, rl_lr=1e-3, grpo_kl_coef=0.04, dgrpo_kl_coef=0.5)
SHORT = dataclasses.replace(
    FULL, vocab_size=512, document_tokens=128, short_tokens=64, train_examples=48,
    short_train_examples=16, heldout_examples=6, teacher_steps=3, cold_start_steps=2,
    method_steps=2, prompts_per_step=2, group_size=2, max_new_tokens=4)

METHODS = ("sft", "sft_reference", "kd", "grpo", "opd", "dgrpo")
ABLATIONS = ("beta", "mix", "anchor", "cold")
BETAS = (0.0, 0.04, 0.5, 1.0)
LONG_SHARES = (0.5, 0.9, 1.0)


def add_experiment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/experiment", help="new output directory")
    parser.add_argument("--seeds", default="0,1,2", help="student seeds, comma-separated")
    parser.add_argument("--ablations", default="",
                        help=f"comma-separated, any of {', '.join(ABLATIONS)} (default: none)")
    parser.add_argument("--teacher", default=None,
                        help="teacher Megatron checkpoint (default: train one by SFT here)")
    parser.add_argument("--short", action="store_true", help="a few steps of everything (tests)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="training runs at a time (each gets 2 / jobs CPU threads)")


# ------------------------------------------------------------------------ the runs


@dataclass(frozen=True)
class Run:
    """One student run of the experiment: ``method`` (or an ablation variant) for ``seed``."""

    name: str
    method: str
    seed: int
    sections: dict[str, Any]  # the run config's sections, deep-merged over the shared ones
    from_cold_start: bool = True


def method_sections(method: str, plan: ExperimentPlan, teacher: str) -> dict[str, Any]:
    """What ``method`` adds to a run config; every method sees ``prompts_per_step x
    group_size`` sequences per optimizer step."""
    sequences = plan.prompts_per_step * plan.group_size
    teacher_section = {"preset": None, "init_from": teacher}
    rollouts = {"sampling": {"n": plan.group_size, "temperature": plan.temperature,
                             "max_new_tokens": plan.max_new_tokens, "stop_strings": ["<|im_end|>"]},
                "prompts_per_step": plan.prompts_per_step, "optim": {"lr": plan.rl_lr}}
    off_policy = {"prompts_per_step": sequences, "optim": {"lr": plan.sft_lr}}
    if method == "sft":
        return {**off_policy, "loss": {"objective": "sft"}, "data": {"target": OFF_POLICY_TARGET}}
    if method == "sft_reference":
        return {**off_policy, "loss": {"objective": "sft"}}
    if method == "kd":
        return {**off_policy, "loss": {"objective": "kd"}, "teacher": teacher_section,
                "data": {"target": OFF_POLICY_TARGET}}
    if method == "grpo":
        return {**rollouts, "loss": {"objective": "grpo", "kl_coef": plan.grpo_kl_coef}}
    if method == "opd":
        return {**rollouts, "loss": {"objective": "opd"}, "teacher": teacher_section}
    if method == "dgrpo":
        return {**rollouts, "loss": {"objective": "dgrpo", "kl_coef": plan.dgrpo_kl_coef},
                "teacher": teacher_section}
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def planned_runs(plan: ExperimentPlan, seeds: list[int], ablations: list[str],
                 teacher: str, short_train: str) -> list[Run]:
    """Every student run: the main comparison, then the asked-for ablations (dGRPO variants;
    the main dGRPO run stands in for the variant equal to it)."""
    runs = [Run(f"{m}-s{seed}", m, seed, method_sections(m, plan, teacher))
            for seed in seeds for m in METHODS]
    dgrpo = method_sections("dgrpo", plan, teacher)

    def variant(label: str, changes: dict[str, Any], from_cold_start: bool = True) -> list[Run]:
        sections = deep_merge(dgrpo, changes)
        return [Run(f"{label}-s{seed}", label, seed, sections, from_cold_start) for seed in seeds]

    for ablation in ablations:
        if ablation == "beta":
            for beta in BETAS:
                if beta != plan.dgrpo_kl_coef:
                    runs += variant(f"dgrpo_beta{beta:g}", {"loss": {"kl_coef": beta}})
        elif ablation == "mix":
            for share in LONG_SHARES:
                runs += variant(f"dgrpo_long{share:g}", {"short_data": {"paths": [short_train]},
                                                         "mix": {"long_share": share}})
        elif ablation == "anchor":
            runs += variant("anchor_reference", {"loss": {"kl_coef": 0.0,
                                                          "ref_kl_coef": plan.dgrpo_kl_coef}})
            runs += variant("anchor_both", {"loss": {"ref_kl_coef": plan.dgrpo_kl_coef}})
        elif ablation == "cold":
            runs += variant("dgrpo_no_cold_start", {}, from_cold_start=False)
        else:
            raise ValueError(f"unknown ablation {ablation!r}; choose from {', '.join(ABLATIONS)}")
    return runs


# ------------------------------------------------------------------------ phases


def make_assets(out: Path, plan: ExperimentPlan) -> dict[str, Path]:
    """Tokenizer, training tasks, the three held-out sets and the short training split."""
    from megatron_dgrpo.data.synth import SynthConfig
    from megatron_dgrpo.data.synth.writer import write_synth_dataset
    from megatron_dgrpo.data.tiny_tokenizer import train_tiny_tokenizer

    root = out / "assets"
    assets = {name: root / name for name in
              ("tokenizer", "train", "short_train", "long", "longer", "short")}
    train_tiny_tokenizer(assets["tokenizer"], vocab_size=plan.vocab_size, lines=8000,
                         documents=200)
    common = {"tasks": plan.tasks, "hops": (1,), "tokenizer": str(assets["tokenizer"]),
              "filler_bank_size": 2000}
    made = {"train": (plan.train_examples, plan.document_tokens, 0),
            "short_train": (plan.short_train_examples, plan.short_tokens, 1),
            "long": (plan.heldout_examples, plan.document_tokens, 2),
            "longer": (plan.heldout_examples, 2 * plan.document_tokens, 3),
            "short": (plan.heldout_examples, plan.short_tokens, 4)}
    for name, (count, tokens, seed) in made.items():
        write_synth_dataset(SynthConfig(num_examples=count, lengths=(tokens,),
                                        seed=1_000_003 * seed, **common), assets[name])
    return assets


def _held_out_sets(assets: dict[str, Path], plan: ExperimentPlan):
    from megatron_dgrpo.recipe import HeldOut

    return [HeldOut("long", str(assets["long"]), str(assets["train"]), plan.max_new_tokens),
            HeldOut("longer", str(assets["longer"]), str(assets["train"]), plan.max_new_tokens),
            HeldOut("short", str(assets["short"]), str(assets["short_train"]), plan.max_new_tokens)]


def _run_dirs(out: Path, run: Run) -> Path:
    return out / "runs" / run.name


def _student_config(out: Path, assets: dict[str, Path], plan: ExperimentPlan, run: Run,
                    cold_start: Path, train_data: Path) -> dict[str, Any]:
    from megatron_dgrpo.recipe import run_config

    student = ({"preset": None, "init_from": str(cold_start)} if run.from_cold_start
               else {"preset": plan.student_preset})
    base = run_config(_run_dirs(out, run), assets["tokenizer"], train_data, 1, run.seed,
                      student=student, steps=plan.method_steps,
                      save_every=plan.method_steps)
    return deep_merge(base, run.sections)


def _train_all(configs: list[dict[str, Any]], jobs: int, console) -> None:
    """Train ``configs`` ``jobs`` at a time (each run in its own spawned process)."""
    from megatron_dgrpo.recipe import train_phase

    threads = max(1, 2 // jobs)

    def one(config: dict[str, Any]) -> None:
        started = time.perf_counter()
        train_phase(config, threads=threads)
        console.print(f"  {Path(config['run_dir']).name} done in "
                      f"{time.perf_counter() - started:.0f} s")

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(one, c) for c in configs]
        for future in futures:
            try:
                future.result()
            except BaseException:
                for pending in futures:  # fail fast: the runs not started yet stay unstarted
                    pending.cancel()
                raise


def _teacher_responses(out: Path, assets: dict[str, Path], teacher: str,
                       plan: ExperimentPlan) -> Path:
    """The training tasks with the teacher's greedy responses (one process)."""
    import subprocess
    import sys

    target = out / "assets" / "train_teacher"
    command = [sys.executable, "-m", "megatron_dgrpo.cli", "data", "teacher-responses",
               "--teacher", teacher, "--tokenizer", str(assets["tokenizer"]),
               "--data", str(assets["train"]), "--out", str(target),
               "--column", OFF_POLICY_TARGET, "--max-new-tokens", str(plan.max_new_tokens)]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"dgrpo data teacher-responses failed:\n{result.stderr[-3000:]}")
    return target


def _summaries(scores: dict[str, dict[str, dict[str, Any]]], runs: list[Run]
               ) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{method: {set: {"all" | family: [score per seed]}}}``."""
    table: dict[str, dict[str, dict[str, list[float]]]] = {}
    for run in runs:
        for set_name, result in scores[run.name].items():
            cell = table.setdefault(run.method, {}).setdefault(set_name, {})
            cell.setdefault("all", []).append(result["all"])
            for family, value in result["families"].items():
                cell.setdefault(family, []).append(value)
    return table


def run_experiment(args: argparse.Namespace) -> int:
    from rich.console import Console

    from megatron_dgrpo.experiment_report import write_experiment_report
    from megatron_dgrpo.outputs import refuse_existing
    from megatron_dgrpo.parallel.launch import run_distributed
    from megatron_dgrpo.recipe import evaluate_models, model_dir, run_config, train_phase

    plan = SHORT if args.short else FULL
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    ablations = [a.strip() for a in args.ablations.split(",") if a.strip()]
    unknown = sorted(set(ablations) - set(ABLATIONS))
    if not seeds or unknown:
        raise ValueError(f"--seeds needs at least one seed and --ablations takes "
                         f"{', '.join(ABLATIONS)} (got {args.seeds!r}, {args.ablations!r})")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    if args.teacher is not None and not Path(args.teacher).is_dir():
        raise ValueError(f"--teacher {args.teacher!r} is not a checkpoint directory")
    out = Path(args.out)
    refuse_existing(out)
    out.mkdir(parents=True)
    console, seconds, started = Console(), {}, time.perf_counter()

    def phase(name: str, text: str) -> None:
        console.rule(f"[bold]{name}[/]: {text}")
        seconds[name] = time.perf_counter()

    def done(name: str) -> None:
        seconds[name] = time.perf_counter() - seconds[name]

    phase("assets", "tokenizer and tasks")
    assets = make_assets(out, plan)
    done("assets")
    phase("teacher", args.teacher or f"SFT of {plan.teacher_preset}")
    teacher = args.teacher
    if teacher is None:
        teacher_run = out / "runs" / "teacher"
        train_phase(run_config(teacher_run, assets["tokenizer"], assets["train"], 1, 12345,
                               student={"preset": plan.teacher_preset}, loss={"objective": "sft"},
                               steps=plan.teacher_steps, save_every=plan.teacher_steps,
                               prompts_per_step=16, optim={"lr": plan.sft_lr}))
        teacher = str(model_dir(teacher_run, plan.teacher_steps))
    train_data = _teacher_responses(out, assets, teacher, plan)
    done("teacher")

    phase("cold start", f"SFT of {plan.student_preset}, {plan.cold_start_steps} steps per seed")
    colds = {seed: out / "runs" / f"cold-start-s{seed}" for seed in seeds}
    _train_all([run_config(path, assets["tokenizer"], train_data, 1, seed,
                           student={"preset": plan.student_preset}, loss={"objective": "sft"},
                           steps=plan.cold_start_steps, save_every=plan.cold_start_steps,
                           prompts_per_step=plan.prompts_per_step * plan.group_size,
                           optim={"lr": plan.sft_lr})
                for seed, path in colds.items()], args.jobs, console)
    done("cold start")

    runs = planned_runs(plan, seeds, ablations, teacher, str(assets["short_train"]))
    phase("methods", f"{len(runs)} runs of {plan.method_steps} steps")
    _train_all([_student_config(out, assets, plan, run,
                                model_dir(colds[run.seed], plan.cold_start_steps), train_data)
                for run in runs], args.jobs, console)
    done("methods")

    phase("eval", "greedy answers on the held-out sets, beside the no-context baseline")
    models = [("teacher", teacher)]
    models += [(f"cold-start-s{seed}", str(model_dir(path, plan.cold_start_steps)))
               for seed, path in colds.items()]
    models += [(run.name, str(model_dir(_run_dirs(out, run), plan.method_steps))) for run in runs]
    scores = run_distributed(evaluate_models, 1, args=(
        models, str(assets["tokenizer"]), _held_out_sets(assets, plan), str(out / "eval")),
        timeout_s=4 * 3600)[0]
    done("eval")

    seconds["total"] = time.perf_counter() - started
    cold_runs = [Run(f"cold-start-s{seed}", "cold_start", seed, {}) for seed in seeds]
    summary = {"plan": dataclasses.asdict(plan), "seeds": seeds, "ablations": ablations,
               "teacher": teacher, "seconds": seconds, "scores": scores,
               "table": _summaries(scores, cold_runs + runs),
               "runs": {run.name: {"method": run.method, "seed": run.seed,
                                   "run_dir": str(_run_dirs(out, run))} for run in runs}}
    (out / "experiment.json").write_text(json.dumps(summary, indent=1) + "\n")
    report = write_experiment_report(out, summary)
    console.print(report)
    return 0
