"""``dgrpo experiment``: the paper in miniature, on CPU. SFT, KD, GRPO, OPD and dGRPO from the
same student, against the same teacher, on the same prompts and budget, over several seeds;
the paper's ablations as options; a report that says whether the paper's ordering held.

    dgrpo experiment --out runs/experiment [--seeds 0,1,2] [--methods sft,...,dgrpo]
                     [--ablations beta,mix,anchor,cold] [--teacher CKPT] [--short] [--jobs 2]

Student and teacher are the quickstart's shipped reader models (``small-qwen3``,
``megatron_dgrpo/assets/quickstart``): the teacher reads 512-token documents, the student
base (task SFT on reference answers, stopped early) scores at the no-context baseline. Every
method starts from that student base. Phases (each an ordinary ``dgrpo`` command with a
generated config, see :mod:`megatron_dgrpo.recipe`):

1. assets: the shipped tokenizer; 1-hop ``multihop`` and ``counterfactual`` training tasks at
   ``document_tokens`` (the same set for every seed), held-out tasks at that length
   (``long``, the quickstart's held-out set) and at twice it (``longer``), and a
   short-context set (``short``, ``short_tokens`` documents) with its own training split for
   the mixing ablation;
2. the teacher's greedy responses to the training prompts (``dgrpo data teacher-responses``),
   what the off-policy baselines train on;
3. per seed and method, ``method_steps`` optimizer steps from the student base, every method
   seeing ``prompts_per_step x group_size`` sequences per step (rollouts on-policy, teacher
   responses or reference answers off-policy), a checkpoint every ``curve_every`` steps:

   ==================  ==============================================================
   ``sft``             SFT on the teacher's responses (the paper's off-policy baseline)
   ``sft_reference``   SFT on the reference answers
   ``kd``              forward KL to the teacher on the teacher's responses (full vocab)
   ``grpo``            GRPO, KL to the frozen student base (``grpo_kl_coef``)
   ``opd``             on-policy reverse KL to the teacher, no reward
   ``dgrpo``           GRPO with the teacher as the KL anchor (``dgrpo_kl_coef``)
   ==================  ==============================================================

   What a seed changes: the on-policy methods read the prompts in file order and the seed
   draws their rollouts; the off-policy ones (and the ``cold`` ablation's SFT) sample
   nothing, so the seed draws the order they read the training set in
   (``data.shuffle_buffer``, a uniformly random permutation per seed), else their seeds
   would be the same run;

4. evaluation: greedy answers of every final student on the three held-out sets, and of the
   intermediate checkpoints on ``long`` (the held-out learning curve), beside the
   no-context baseline (fitted on the training tasks), per family and needle depth;
5. ``report.md``, ``experiment.json`` and PNGs: mean +- std over seeds, learning curves,
   and a paragraph on whether the paper's ordering held.

Ablations (``--ablations``), dGRPO variants over the same seeds: ``beta`` (teacher-KL weight
0, 0.04, 0.5, 1.0), ``mix`` (long-context token share 0.5, 0.9, 1.0 with the short set
mixed in), ``anchor`` (KL to the reference, to the teacher, to both), ``cold`` (an SFT cold
start on the teacher's responses, ``cold_start_steps`` per seed, before dGRPO; the main runs
have none beyond the student base).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
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

    document_tokens: int  # training and ``long`` documents; ``longer`` has twice as many
    short_tokens: int  # documents of the short-context set
    train_examples: int
    short_train_examples: int  # the short-context training split (mixing ablation, baseline)
    heldout_examples: int  # per held-out set
    method_steps: int  # optimizer steps of every method
    curve_every: int  # steps between the checkpoints of the held-out learning curve
    cold_start_steps: int  # SFT steps of the ``cold`` ablation's cold start
    prompts_per_step: int
    group_size: int  # rollouts per prompt; off-policy methods see as many sequences per step
    temperature: float  # of the rollouts, and of the trained policy softmax(logits / T)
    max_new_tokens: int
    sft_lr: float
    rl_lr: float
    grpo_kl_coef: float
    dgrpo_kl_coef: float


FULL = ExperimentPlan(
    document_tokens=512, short_tokens=64, train_examples=2000, short_train_examples=1000,
    heldout_examples=128, method_steps=120, curve_every=40, cold_start_steps=40,
    prompts_per_step=4, group_size=4, temperature=0.6, max_new_tokens=12, sft_lr=1e-3,
    rl_lr=1e-3, grpo_kl_coef=0.04, dgrpo_kl_coef=1.0)
SHORT = dataclasses.replace(
    FULL, document_tokens=128, short_tokens=64, train_examples=32, short_train_examples=16,
    heldout_examples=6, method_steps=2, curve_every=1, cold_start_steps=1, prompts_per_step=2,
    group_size=2, max_new_tokens=4)

METHODS = ("sft", "sft_reference", "kd", "grpo", "opd", "dgrpo")
ABLATIONS = ("beta", "mix", "anchor", "cold")
BETAS = (0.0, 0.04, 0.5, 1.0)
LONG_SHARES = (0.5, 0.9, 1.0)


def add_experiment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/experiment", help="new output directory")
    parser.add_argument("--seeds", default="0,1,2", help="student seeds, comma-separated")
    parser.add_argument("--ablations", default="",
                        help=f"comma-separated, any of {', '.join(ABLATIONS)} (default: none)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="main-table methods, comma-separated (default: all; e.g. "
                             "--methods dgrpo --ablations beta runs the ablation beside dGRPO)")
    parser.add_argument("--teacher", default=None,
                        help="teacher Megatron checkpoint with the shipped tokenizer's "
                             "vocabulary (default: the quickstart's shipped teacher)")
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
    sft_cold_start: bool = False  # from this seed's SFT cold start instead of the student base


def method_sections(method: str, plan: ExperimentPlan, teacher: str) -> dict[str, Any]:
    """What ``method`` adds to a run config; every method sees ``prompts_per_step x
    group_size`` sequences per optimizer step."""
    sequences = plan.prompts_per_step * plan.group_size
    teacher_section = {"preset": None, "init_from": teacher}
    rollouts = {"sampling": {"n": plan.group_size, "temperature": plan.temperature,
                             "max_new_tokens": plan.max_new_tokens, "stop_strings": ["<|im_end|>"]},
                "prompts_per_step": plan.prompts_per_step, "optim": {"lr": plan.rl_lr}}
    off_policy = {"prompts_per_step": sequences, "optim": {"lr": plan.sft_lr}}
    shuffled = {"shuffle_buffer": plan.train_examples}  # the seed's permutation of the set
    if method == "sft":
        return {**off_policy, "loss": {"objective": "sft"},
                "data": {**shuffled, "target": OFF_POLICY_TARGET}}
    if method == "sft_reference":
        return {**off_policy, "loss": {"objective": "sft"}, "data": shuffled}
    if method == "kd":
        return {**off_policy, "loss": {"objective": "kd"}, "teacher": teacher_section,
                "data": {**shuffled, "target": OFF_POLICY_TARGET}}
    if method == "grpo":
        return {**rollouts, "loss": {"objective": "grpo", "kl_coef": plan.grpo_kl_coef}}
    if method == "opd":
        return {**rollouts, "loss": {"objective": "opd"}, "teacher": teacher_section}
    if method == "dgrpo":
        return {**rollouts, "loss": {"objective": "dgrpo", "kl_coef": plan.dgrpo_kl_coef},
                "teacher": teacher_section}
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def planned_runs(plan: ExperimentPlan, seeds: list[int], ablations: list[str],
                 teacher: str, short_train: str, methods: tuple[str, ...] = METHODS) -> list[Run]:
    """Every student run: the main comparison, then the asked-for ablations (dGRPO variants;
    the main dGRPO run stands in for the variants equal to it: its beta, long share 1.0)."""
    runs = [Run(f"{m}-s{seed}", m, seed, method_sections(m, plan, teacher))
            for seed in seeds for m in methods]
    dgrpo = method_sections("dgrpo", plan, teacher)

    def variant(label: str, changes: dict[str, Any], sft_cold_start: bool = False) -> list[Run]:
        sections = deep_merge(dgrpo, changes)
        return [Run(f"{label}-s{seed}", label, seed, sections, sft_cold_start) for seed in seeds]

    for ablation in ablations:
        if ablation == "beta":
            for beta in BETAS:
                if beta != plan.dgrpo_kl_coef:
                    runs += variant(f"dgrpo_beta{beta:g}", {"loss": {"kl_coef": beta}})
        elif ablation == "mix":
            for share in LONG_SHARES:
                if share == 1.0:  # every token from the long set: the main dgrpo run
                    continue
                runs += variant(f"dgrpo_long{share:g}", {"short_data": {"paths": [short_train]},
                                                         "mix": {"long_share": share}})
        elif ablation == "anchor":
            runs += variant("anchor_reference", {"loss": {"kl_coef": 0.0,
                                                          "ref_kl_coef": plan.dgrpo_kl_coef}})
            runs += variant("anchor_both", {"loss": {"ref_kl_coef": plan.dgrpo_kl_coef}})
        elif ablation == "cold":
            runs += variant("dgrpo_sft_cold_start", {}, sft_cold_start=True)
        else:
            raise ValueError(f"unknown ablation {ablation!r}; choose from {', '.join(ABLATIONS)}")
    return runs


# ------------------------------------------------------------------------ phases


def make_assets(out: Path, plan: ExperimentPlan) -> dict[str, Path]:
    """The shipped tokenizer, the training tasks, the short training split and the three
    held-out sets under ``out/assets``; their paths by name. ``long`` is the quickstart's
    held-out set when the plan has its length and size."""
    from megatron_dgrpo.data.synth import SynthConfig
    from megatron_dgrpo.data.synth.writer import write_synth_dataset
    from megatron_dgrpo.quickstart import HELDOUT_SEED, QUICKSTART_ASSETS, QUICKSTART_TASKS

    root = out / "assets"
    assets = {name: root / name for name in
              ("tokenizer", "train", "short_train", "long", "longer", "short")}
    shutil.copytree(QUICKSTART_ASSETS / "tokenizer", assets["tokenizer"])
    common = {"tasks": QUICKSTART_TASKS, "hops": (1,), "tokenizer": str(assets["tokenizer"]),
              "filler_bank_size": 2000}
    made = {"train": (plan.train_examples, plan.document_tokens, 0),
            "short_train": (plan.short_train_examples, plan.short_tokens, 1),
            "long": (plan.heldout_examples, plan.document_tokens, HELDOUT_SEED),
            "longer": (plan.heldout_examples, 2 * plan.document_tokens, HELDOUT_SEED + 1),
            "short": (plan.heldout_examples, plan.short_tokens, HELDOUT_SEED + 2)}
    for name, (count, tokens, seed) in made.items():
        write_synth_dataset(SynthConfig(num_examples=count, lengths=(tokens,), seed=seed,
                                        **common), assets[name])
    return assets


def _held_out_sets(assets: dict[str, Path], plan: ExperimentPlan):
    from megatron_dgrpo.recipe import HeldOut

    return [HeldOut("long", str(assets["long"]), str(assets["train"]), plan.max_new_tokens),
            HeldOut("longer", str(assets["longer"]), str(assets["train"]), plan.max_new_tokens),
            HeldOut("short", str(assets["short"]), str(assets["short_train"]), plan.max_new_tokens)]


def _run_dir(out: Path, run: Run) -> Path:
    return out / "runs" / run.name


def _cold_start_dir(out: Path, seed: int) -> Path:
    return out / "runs" / f"sft-cold-start-s{seed}"


def _initial_model(out: Path, plan: ExperimentPlan, run: Run, student_base: Path) -> Path:
    """The checkpoint ``run`` starts from."""
    from megatron_dgrpo.recipe import model_dir

    if run.sft_cold_start:
        return model_dir(_cold_start_dir(out, run.seed), plan.cold_start_steps)
    return student_base


def _student_config(out: Path, assets: dict[str, Path], plan: ExperimentPlan, run: Run,
                    initial: Path, train_data: Path) -> dict[str, Any]:
    from megatron_dgrpo.recipe import run_config

    base = run_config(_run_dir(out, run), assets["tokenizer"], train_data, 1, run.seed,
                      student={"preset": None, "init_from": str(initial)},
                      steps=plan.method_steps, save_every=plan.curve_every)
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


STUDENT_BASE_ROW = "student_base"  # the table's row for the model every main run starts from


def _labelled_rows(runs: list[Run]) -> list[tuple[str, str]]:
    """``(evaluated model label, table row)`` pairs: the student base, then every run."""
    return [(STUDENT_BASE_ROW, STUDENT_BASE_ROW)] + [(run.name, run.method) for run in runs]


def summarise(scores: dict[str, dict[str, dict[str, Any]]], runs: list[Run]
              ) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{method: {set: {"all" | family: [score per seed]}}}`` from the final models' scores;
    the student base is one row with one value."""
    table: dict[str, dict[str, dict[str, list[float]]]] = {}
    for label, method in _labelled_rows(runs):
        for set_name, result in scores[label].items():
            cell = table.setdefault(method, {}).setdefault(set_name, {})
            cell.setdefault("all", []).append(result["all"])
            for family, value in result["families"].items():
                cell.setdefault(family, []).append(value)
    return table


def depth_table(scores: dict[str, dict[str, dict[str, Any]]], runs: list[Run], set_name: str
                ) -> dict[str, dict[str, list[float]]]:
    """``{method: {needle depth: [score per seed]}}`` over all families on ``set_name``."""
    from megatron_dgrpo.data.evaluate import ALL

    table: dict[str, dict[str, list[float]]] = {}
    for label, method in _labelled_rows(runs):
        for depth, value in scores[label][set_name]["depths"][ALL].items():
            table.setdefault(method, {}).setdefault(str(depth), []).append(value)
    return table


def curve_steps(plan: ExperimentPlan) -> list[int]:
    """The intermediate checkpoints on the held-out learning curve (the final one apart)."""
    return list(range(plan.curve_every, plan.method_steps, plan.curve_every))


def learning_curves(final: dict[str, dict[str, dict[str, Any]]],
                    intermediate: dict[str, dict[str, dict[str, Any]]], runs: list[Run],
                    plan: ExperimentPlan, initial_labels: dict[str, str]
                    ) -> dict[str, dict[str, list[float]]]:
    """``{method: {step: [long score per seed]}}``, step 0 the model each run started from."""
    curves: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        points = [(0, intermediate[initial_labels[run.name]]["long"]["all"])]
        points += [(step, intermediate[f"{run.name}@{step}"]["long"]["all"])
                   for step in curve_steps(plan)]
        points.append((plan.method_steps, final[run.name]["long"]["all"]))
        for step, value in points:
            curves.setdefault(run.method, {}).setdefault(str(step), []).append(value)
    return curves


def run_experiment(args: argparse.Namespace) -> int:
    from rich.console import Console

    from megatron_dgrpo.experiment_report import write_experiment_report
    from megatron_dgrpo.outputs import refuse_existing
    from megatron_dgrpo.parallel.launch import run_distributed
    from megatron_dgrpo.quickstart import STUDENT_BASE, TEACHER, shipped_model
    from megatron_dgrpo.recipe import evaluate_models, model_dir, run_config

    plan = SHORT if args.short else FULL
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    ablations = [a.strip() for a in args.ablations.split(",") if a.strip()]
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = sorted(set(ablations) - set(ABLATIONS))
    if not seeds or unknown:
        raise ValueError(f"--seeds needs at least one seed and --ablations takes "
                         f"{', '.join(ABLATIONS)} (got {args.seeds!r}, {args.ablations!r})")
    if not methods or set(methods) - set(METHODS):
        raise ValueError(f"--methods takes {', '.join(METHODS)} (got {args.methods!r})")
    if ablations and "dgrpo" not in methods:
        raise ValueError("the ablations are dGRPO variants compared with the main dgrpo run: "
                         "--methods must include dgrpo")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {args.seeds!r} repeats a seed")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    if args.teacher is not None and not Path(args.teacher).is_dir():
        raise ValueError(f"--teacher {args.teacher!r} is not a checkpoint directory")
    out = Path(args.out)
    refuse_existing(out)
    teacher = args.teacher or str(shipped_model(TEACHER))
    student_base = shipped_model(STUDENT_BASE)
    out.mkdir(parents=True)
    console, seconds, started = Console(), {}, time.perf_counter()

    def phase(name: str, text: str) -> None:
        console.rule(f"[bold]{name}[/]: {text}")
        seconds[name] = time.perf_counter()

    def done(name: str) -> None:
        seconds[name] = time.perf_counter() - seconds[name]
        console.print(f"[green]{name} done[/] in {seconds[name]:.0f} s")

    phase("assets", "tokenizer and tasks")
    assets = make_assets(out, plan)
    done("assets")
    phase("teacher responses", f"greedy answers of {teacher} to the training prompts")
    train_data = _teacher_responses(out, assets, teacher, plan)
    done("teacher responses")

    runs = planned_runs(plan, seeds, ablations, teacher, str(assets["short_train"]), methods)
    cold_seeds = sorted({run.seed for run in runs if run.sft_cold_start})
    if cold_seeds:
        phase("sft cold start", f"{plan.cold_start_steps} SFT steps on the teacher's responses "
                                f"per seed (the cold ablation)")
        sft = method_sections("sft", plan, teacher)
        _train_all([deep_merge(run_config(_cold_start_dir(out, seed), assets["tokenizer"],
                                          train_data, 1, seed, steps=plan.cold_start_steps,
                                          save_every=plan.cold_start_steps,
                                          student={"preset": None,
                                                   "init_from": str(student_base)}), sft)
                    for seed in cold_seeds], args.jobs, console)
        done("sft cold start")

    phase("methods", f"{len(runs)} runs of {plan.method_steps} steps, {args.jobs} at a time")
    _train_all([_student_config(out, assets, plan, run,
                                _initial_model(out, plan, run, student_base), train_data)
                for run in runs], args.jobs, console)
    done("methods")

    phase("eval", "greedy answers on the held-out sets, beside the no-context baseline")
    sets = _held_out_sets(assets, plan)
    final = [("teacher", teacher), (STUDENT_BASE_ROW, str(student_base))]
    final += [(run.name, str(model_dir(_run_dir(out, run), plan.method_steps))) for run in runs]
    initial_labels = {run.name: (f"sft-cold-start-s{run.seed}" if run.sft_cold_start
                                 else STUDENT_BASE_ROW) for run in runs}
    along = [(f"sft-cold-start-s{seed}", str(model_dir(_cold_start_dir(out, seed),
                                                         plan.cold_start_steps)))
             for seed in cold_seeds] + [(STUDENT_BASE_ROW, str(student_base))]
    along += [(f"{run.name}@{step}", str(model_dir(_run_dir(out, run), step)))
              for run in runs for step in curve_steps(plan)]
    scores = run_distributed(evaluate_models, 1, args=(
        final, str(assets["tokenizer"]), sets, str(out / "eval")), timeout_s=4 * 3600)[0]
    along_scores = run_distributed(evaluate_models, 1, args=(
        along, str(assets["tokenizer"]), sets[:1], str(out / "eval-curve")),
        timeout_s=4 * 3600)[0]
    done("eval")

    seconds["total"] = time.perf_counter() - started
    summary = {"plan": dataclasses.asdict(plan), "seeds": seeds, "ablations": ablations,
               "teacher": teacher, "student_base": str(student_base), "seconds": seconds,
               "scores": scores, "table": summarise(scores, runs),
               "depths": depth_table(scores, runs, "long"),
               "curves": learning_curves(scores, along_scores, runs, plan, initial_labels),
               "runs": {run.name: {"method": run.method, "seed": run.seed,
                                   "run_dir": str(_run_dir(out, run))} for run in runs}}
    (out / "experiment.json").write_text(json.dumps(summary, indent=1) + "\n")
    report = write_experiment_report(out, summary)
    console.print(report)
    return 0
