"""``dgrpo quickstart``: dGRPO teaches a student to read, on a laptop-class CPU, offline.

    dgrpo quickstart [--out runs/quickstart] [--seed 0] [--short] [--tp 1|2]

Two CPU cores cannot teach a model to read in 15 minutes, so the quickstart starts from two
models shipped in ``megatron_dgrpo/assets/quickstart`` (``small-qwen3``, 4 layers, 1M
parameters, 4 MB each; made by this package's own training code, command and training logs
beside them, see ``tools/make_quickstart_models.py``): a **teacher** that reads, and a
**student base** of the same lineage, stopped earlier, that knows the answer format but scores
no better than answering without the document. Each phase, with progress on the console and
its outputs under ``--out``:

1. ``assets/``: the shipped tokenizer; 1-hop ``multihop`` and ``counterfactual`` retrieval
   tasks on documents of 512 measured tokens (``dgrpo data synth``), a training set from
   ``--seed`` and a fixed held-out set (the same for every seed, so that seeds differ only
   in training);
2. ``runs/student-dgrpo``: dGRPO from the student base, the teacher as the KL anchor
   (rollouts, exact-match rewards, group advantages, full-vocabulary KL to the teacher), a
   checkpoint every ``eval_every`` steps. Rollouts are sampled at temperature 0.6, and the
   trained policy is that tempered policy (``train_temperature: sampling``);
3. ``eval/<model>/heldout``: greedy answers on the held-out set for the teacher, the student
   base (dGRPO step 0, the cold start) and every student checkpoint (``scores.md``,
   ``heatmap.png``, ``predictions.jsonl``), beside the no-context baseline (the most frequent
   training answer per task and question template);
4. ``report.md``, ``quickstart.json``, ``heldout_reward.png``: the held-out table and curve,
   and the run's training curves (``runs/student-dgrpo/report/``, from ``dgrpo report``).

Every phase is an ordinary command of this package run with a generated config, so the
quickstart is also a worked example: ``runs/student-dgrpo/config.yaml`` can be re-run with
``dgrpo train``. ``--short`` is the same pipeline with a few steps (for tests; it shows the
wiring, not learning).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUICKSTART_ASSETS = Path(__file__).resolve().parent / "assets" / "quickstart"
READER_PRESET = "small-qwen3"  # the architecture of both shipped models
STUDENT_BASE, TEACHER = "student-base", "teacher"  # shipped checkpoints under QUICKSTART_ASSETS
QUICKSTART_TASKS = ("multihop", "counterfactual")  # 1-hop lookup, counterfactual grounding
HELDOUT_SEED = 1_000_003  # the held-out set is the same for every --seed


@dataclass(frozen=True)
class QuickstartPlan:
    """Sizes of one quickstart; :data:`FULL` is the documented run, :data:`SHORT` the test."""

    document_tokens: int  # length of each generated document (counted with the tokenizer)
    train_examples: int
    heldout_examples: int
    dgrpo_steps: int
    eval_every: int  # dGRPO steps between held-out evaluations
    prompts_per_step: int
    group_size: int  # rollouts per prompt
    temperature: float  # of the rollouts, and of the trained policy softmax(logits / T)
    max_new_tokens: int
    lr: float
    kl_coef: float


FULL = QuickstartPlan(document_tokens=512, train_examples=2000, heldout_examples=128,
                      dgrpo_steps=200, eval_every=40, prompts_per_step=8, group_size=4,
                      temperature=0.6, max_new_tokens=12, lr=1e-3, kl_coef=1.0)
SHORT = dataclasses.replace(FULL, train_examples=24, heldout_examples=8, dgrpo_steps=2,
                            eval_every=1, prompts_per_step=2, group_size=2, max_new_tokens=4)


def add_quickstart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/quickstart",
                        help="new output directory (default: runs/quickstart)")
    parser.add_argument("--short", action="store_true",
                        help="a few steps of every phase: checks the wiring in ~2 minutes")
    parser.add_argument("--tp", type=int, default=1, choices=(1, 2),
                        help="tensor-parallel ranks of every phase (default 1: fastest on 2 cores)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the training data and of dGRPO (the held-out set is fixed)")


# ------------------------------------------------------------------------ phases


def shipped_model(label: str, assets: Path = QUICKSTART_ASSETS) -> Path:
    """The shipped Megatron checkpoint ``label`` (:data:`STUDENT_BASE` or :data:`TEACHER`),
    after checking its weight files against ``manifest.json``: a missing file, a Git LFS
    pointer in place of the weights or any changed byte is refused, naming the file."""
    manifest_path = assets / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"the quickstart's shipped models are missing: no {manifest_path} "
                                "(a partial checkout? tools/make_quickstart_models.py "
                                "--install makes them)")
    entry = json.loads(manifest_path.read_text())["models"][label]
    for name, expected in entry["sha256"].items():
        path = assets / label / name
        if not path.is_file():
            raise FileNotFoundError(f"shipped model {label}: {path} is missing")
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            raise ValueError(f"shipped model {label}: {path} does not match manifest.json "
                             f"(sha256 {actual[:12]}..., expected {expected[:12]}...; "
                             f"{path.stat().st_size} bytes): a Git LFS pointer or a changed file")
    return assets / label


def make_assets(out: Path, plan: QuickstartPlan, seed: int) -> dict[str, Path]:
    """The shipped tokenizer and the train / held-out data under ``out/assets``; their paths
    by name."""
    from megatron_dgrpo.data.synth import SynthConfig
    from megatron_dgrpo.data.synth.writer import write_synth_dataset

    assets = {"tokenizer": out / "assets" / "tokenizer", "train": out / "assets" / "train",
              "heldout": out / "assets" / "heldout"}
    shutil.copytree(QUICKSTART_ASSETS / "tokenizer", assets["tokenizer"])
    common = {"lengths": (plan.document_tokens,), "tasks": QUICKSTART_TASKS, "hops": (1,),
              "tokenizer": str(assets["tokenizer"]), "filler_bank_size": 2000}
    write_synth_dataset(SynthConfig(num_examples=plan.train_examples, seed=seed, **common),
                        assets["train"])
    write_synth_dataset(SynthConfig(num_examples=plan.heldout_examples, seed=HELDOUT_SEED,
                                    **common), assets["heldout"])
    return assets


# ------------------------------------------------------------------------ report


def _plot_heldout(curve: list[tuple[int, float]], teacher: float, baseline: float,
                  out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.6), layout="constrained")
    axis.plot([s for s, _ in curve], [v for _, v in curve], marker="o", label="student (dGRPO)")
    axis.axhline(teacher, color="tab:green", linestyle="--", label="teacher (shipped)")
    axis.axhline(baseline, color="tab:gray", linestyle=":", label="no-context baseline")
    axis.set_xlabel("dGRPO step")
    axis.set_ylabel("held-out reward x 100 (greedy)")
    axis.set_ylim(bottom=0)
    axis.legend()
    figure.savefig(out_png, dpi=100)
    plt.close(figure)


def _report_markdown(summary: dict[str, Any]) -> str:
    scores = summary["heldout"]
    families = sorted({f for row in scores.values() for f in row if f != "all"})
    plan = summary["plan"]
    lines = ["# dgrpo quickstart", "",
             f"Student and teacher `{READER_PRESET}` (shipped, "
             f"`megatron_dgrpo/assets/quickstart`), seed {summary['seed']}, tensor parallel "
             f"{summary['tensor_parallel']}, {summary['plan_name']} plan. Held-out reward "
             f"(mean reward x 100, greedy, {plan['heldout_examples']} prompts, documents of "
             f"{plan['document_tokens']} measured tokens):", "",
             "| model | all | " + " | ".join(families) + " |",
             "|---|---:|" + "---:|" * len(families)]
    rows = [*scores.items(), ("no-context baseline", summary["baseline"])]
    for label, row in rows:
        cells = [row.get("all")] + [row.get(f) for f in families]
        lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in cells)
                     + " |")
    verdict = ("rose" if summary["learning"] else "did NOT rise")
    lines += ["", f"Held-out reward of the student {verdict} during dGRPO: "
              f"{summary['student_before']:.1f} -> {summary['student_after']:.1f} "
              f"(teacher {summary['teacher']:.1f}, no-context baseline "
              f"{summary['baseline']['all']:.1f}: the most frequent training answer per task and "
              f"question template, no document). One seed: compare seeds before reading a "
              f"difference of a few points (README). Curve: `heldout_reward.png`.", "",
              "Training curves: `runs/student-dgrpo/report/summary.md` and `curves.png`. "
              "Per-model answers: `eval/<model>/heldout/predictions.jsonl`.", "",
              "| phase | seconds |", "|---|---:|"]
    lines += [f"| {phase} | {seconds:.0f} |" for phase, seconds in summary["seconds"].items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ command


def run_quickstart(args: argparse.Namespace, plan: QuickstartPlan | None = None) -> int:
    """The command (``plan``: sizes other than :data:`FULL` / :data:`SHORT`, for tests)."""
    from rich.console import Console

    from megatron_dgrpo.data.chat import IM_END
    from megatron_dgrpo.outputs import refuse_existing
    from megatron_dgrpo.parallel.launch import run_distributed
    from megatron_dgrpo.recipe import HeldOut, evaluate_models, model_dir, run_config, train_phase

    if plan is not None:
        plan_name = "reduced"
    else:
        plan, plan_name = (SHORT, "short") if args.short else (FULL, "full")
    console = Console()
    out = Path(args.out)
    refuse_existing(out)
    if args.seed == HELDOUT_SEED:
        raise ValueError(f"--seed {HELDOUT_SEED} is the held-out set's seed: the training set "
                         "would be the held-out set; choose another")
    teacher, student_base = shipped_model(TEACHER), shipped_model(STUDENT_BASE)
    out.mkdir(parents=True)
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    def phase(name: str, text: str):
        console.rule(f"[bold]{name}[/]: {text}")
        seconds[name] = time.perf_counter()

    def done(name: str) -> None:
        seconds[name] = time.perf_counter() - seconds[name]
        console.print(f"[green]{name} done[/] in {seconds[name]:.0f} s")

    phase("data", f"{plan.train_examples} training and {plan.heldout_examples} held-out tasks "
                  f"({', '.join(QUICKSTART_TASKS)}) on {plan.document_tokens}-token documents")
    assets = make_assets(out, plan, args.seed)
    done("data")

    dgrpo_run = out / "runs" / "student-dgrpo"
    phase("dgrpo", f"dGRPO of the shipped student base for {plan.dgrpo_steps} steps, the "
                   f"shipped teacher as the anchor")
    train_phase(run_config(
        dgrpo_run, assets["tokenizer"], assets["train"], args.tp, args.seed,
        student={"preset": None, "init_from": str(student_base)},
        teacher={"preset": None, "init_from": str(teacher)},
        loss={"objective": "dgrpo", "kl_coef": plan.kl_coef},
        sampling={"n": plan.group_size, "temperature": plan.temperature,
                  "max_new_tokens": plan.max_new_tokens, "stop_strings": [IM_END]},
        optim={"lr": plan.lr}, prompts_per_step=plan.prompts_per_step,
        steps=plan.dgrpo_steps, save_every=plan.eval_every), args.tp)
    done("dgrpo")

    phase("eval", "greedy answers on the held-out set: teacher, student through dGRPO")
    eval_steps = list(range(plan.eval_every, plan.dgrpo_steps + 1, plan.eval_every))
    models = [("teacher", str(teacher)), ("student-step-0", str(student_base))]
    models += [(f"student-step-{s}", str(model_dir(dgrpo_run, s))) for s in eval_steps]
    held_out = HeldOut("heldout", str(assets["heldout"]), str(assets["train"]), plan.max_new_tokens)
    scored = run_distributed(evaluate_models, 1, args=(models, str(assets["tokenizer"]),
                                                       [held_out], str(out / "eval")),
                             timeout_s=3600)[0]
    heldout = {label: {**sets["heldout"]["families"], "all": sets["heldout"]["all"]}
               for label, sets in scored.items()}
    baseline = scored["teacher"]["heldout"]["baseline"]  # the same for every model
    done("eval")

    curve = [(0, heldout["student-step-0"]["all"])]
    curve += [(s, heldout[f"student-step-{s}"]["all"]) for s in eval_steps]
    summary = {"plan_name": plan_name, "plan": dataclasses.asdict(plan), "seed": args.seed,
               "tensor_parallel": args.tp, "heldout": heldout, "baseline": baseline,
               "teacher": heldout["teacher"]["all"], "student_before": curve[0][1],
               "student_after": curve[-1][1], "learning": curve[-1][1] > curve[0][1],
               "curve": curve}
    seconds["total"] = time.perf_counter() - started
    summary["seconds"] = seconds
    _plot_heldout(curve, summary["teacher"], baseline["all"], out / "heldout_reward.png")
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(_report_markdown(summary))
    console.print(_report_markdown(summary))
    console.print(f"[bold]report:[/] {out / 'report.md'}")
    return 0
