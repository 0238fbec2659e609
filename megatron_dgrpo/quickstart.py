"""``dgrpo quickstart``: the whole method on a laptop-class CPU, no network, no downloaded weights.

    dgrpo quickstart [--out runs/quickstart] [--short] [--tp 1|2]

What it does, each phase with progress on the console and its outputs under ``--out``:

1. ``assets/tokenizer``: a ChatML byte-level BPE trained on generated text;
2. ``assets/train``, ``assets/heldout``: LongBlocks-style tasks with verifiable answers
   (``dgrpo data synth``), the held-out set from another seed;
3. ``runs/teacher-sft``: the teacher (``small-qwen3``, 4 layers) trained by SFT on the
   reference answers, so that it is stronger than the student;
4. ``runs/student-cold-start``: the student (``tiny-qwen3``, 2 layers) after a short SFT
   warm start, the usual cold start before RL;
5. ``runs/student-dgrpo``: dGRPO from the cold start, the teacher as the KL anchor, with a
   checkpoint every ``eval_every`` steps. Rollouts are sampled at temperature 0.6: a 2-layer
   student samples near-uniform junk at temperature 1 and so never visits the prefixes on
   which the teacher's guidance matters (e.g. the last token of "unanswerable"). The trained
   policy is the sampling policy ``softmax(logits / 0.6)`` (``train_temperature: sampling``,
   the default), for the student, the teacher's KL and the engines' log-probs alike;
6. ``eval/<model>/heldout``: greedy answers on the held-out set for the teacher and for every
   student checkpoint (``scores.md``, ``heatmap.png``, ``predictions.jsonl``);
7. ``report.md``, ``quickstart.json``, ``heldout_reward.png``: held-out reward of the
   teacher and of the student through dGRPO, and each run's training curves
   (``runs/*/report/``, from ``dgrpo report``).

Every phase is an ordinary command of this package run with a generated config, so the
quickstart is also a worked example: ``runs/*/config.yaml`` can be re-run with ``dgrpo
train``. ``--short`` is the same pipeline with a few steps (for tests; it shows the wiring,
not learning).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEACHER_PRESET = "small-qwen3"
STUDENT_PRESET = "tiny-qwen3"
# Families and tasks a 1M-parameter model can make progress on in minutes; the long-answer
# tasks (list_items, event_order) and arithmetic (sum_values) need far more training.
QUICKSTART_TASKS = ("multihop", "counterfactual", "unanswerable", "count_items", "section_lookup")


@dataclass(frozen=True)
class QuickstartPlan:
    """Sizes of one quickstart; :data:`FULL` is the documented run, :data:`SHORT` the test."""

    vocab_size: int
    document_tokens: int  # length of each generated document (counted with the tokenizer)
    train_examples: int
    heldout_examples: int
    teacher_sft_steps: int
    cold_start_steps: int
    dgrpo_steps: int
    eval_every: int  # dGRPO steps between held-out evaluations
    sft_prompts_per_step: int
    dgrpo_prompts_per_step: int
    group_size: int  # rollouts per prompt
    temperature: float  # of the rollouts, and of the trained policy softmax(logits / T)
    max_new_tokens: int
    sft_lr: float
    dgrpo_lr: float
    kl_coef: float


FULL = QuickstartPlan(vocab_size=1024, document_tokens=64, train_examples=4000,
                      heldout_examples=96, teacher_sft_steps=300, cold_start_steps=22,
                      dgrpo_steps=90, eval_every=15, sft_prompts_per_step=16,
                      dgrpo_prompts_per_step=8, group_size=4, temperature=0.6,
                      max_new_tokens=12, sft_lr=3e-3, dgrpo_lr=1e-3, kl_coef=1.0)
SHORT = dataclasses.replace(FULL, train_examples=64, heldout_examples=8, teacher_sft_steps=4,
                            cold_start_steps=2, dgrpo_steps=2, eval_every=1,
                            sft_prompts_per_step=4, dgrpo_prompts_per_step=2, group_size=2,
                            max_new_tokens=4)


def add_quickstart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/quickstart",
                        help="new output directory (default: runs/quickstart)")
    parser.add_argument("--short", action="store_true",
                        help="a few steps of every phase: checks the wiring in ~2 minutes")
    parser.add_argument("--tp", type=int, default=1, choices=(1, 2),
                        help="tensor-parallel ranks of every phase (default 1: fastest on 2 cores)")
    parser.add_argument("--seed", type=int, default=0)


# ------------------------------------------------------------------------ phases


def make_assets(out: Path, plan: QuickstartPlan, seed: int) -> dict[str, Path]:
    """The quickstart's tokenizer and train / held-out data under ``out/assets``; their paths
    by name (also the workload of ``benchmarks/e2e_step.py``)."""
    from megatron_dgrpo.data.synth import SynthConfig
    from megatron_dgrpo.data.synth.writer import write_synth_dataset
    from megatron_dgrpo.data.tiny_tokenizer import train_tiny_tokenizer

    assets = {"tokenizer": out / "assets" / "tokenizer", "train": out / "assets" / "train",
              "heldout": out / "assets" / "heldout"}
    train_tiny_tokenizer(assets["tokenizer"], vocab_size=plan.vocab_size)
    common = {"lengths": (plan.document_tokens,), "tasks": QUICKSTART_TASKS, "hops": (1,),
              "tokenizer": str(assets["tokenizer"]), "filler_bank_size": 2000}
    write_synth_dataset(SynthConfig(num_examples=plan.train_examples, seed=seed, **common),
                        assets["train"])
    write_synth_dataset(SynthConfig(num_examples=plan.heldout_examples, seed=seed + 1_000_003,
                                    **common), assets["heldout"])
    return assets


# ------------------------------------------------------------------------ report


def _plot_heldout(curve: list[tuple[int, float]], teacher: float, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.6), layout="constrained")
    axis.plot([s for s, _ in curve], [v for _, v in curve], marker="o", label="student (dGRPO)")
    axis.axhline(teacher, color="tab:green", linestyle="--", label="teacher (SFT)")
    axis.set_xlabel("dGRPO step")
    axis.set_ylabel("held-out reward x 100 (greedy)")
    axis.set_ylim(bottom=0)
    axis.legend()
    figure.savefig(out_png, dpi=100)
    plt.close(figure)


def _report_markdown(summary: dict[str, Any]) -> str:
    scores = summary["heldout"]
    families = sorted({f for row in scores.values() for f in row if f != "all"})
    lines = ["# dgrpo quickstart", "",
             f"Student `{STUDENT_PRESET}`, teacher `{TEACHER_PRESET}`, tensor parallel "
             f"{summary['tensor_parallel']}, {summary['plan_name']} plan. Held-out reward "
             f"(mean reward x 100, greedy, {summary['plan']['heldout_examples']} prompts):", "",
             "| model | all | " + " | ".join(families) + " |",
             "|---|---:|" + "---:|" * len(families)]
    for label, row in scores.items():
        cells = [row.get("all")] + [row.get(f) for f in families]
        lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in cells)
                     + " |")
    verdict = ("rose" if summary["learning"] else "did NOT rise")
    lines += ["", f"Held-out reward of the student {verdict} during dGRPO: "
              f"{summary['student_before']:.1f} -> {summary['student_after']:.1f} "
              f"(teacher {summary['teacher']:.1f}). Curve: `heldout_reward.png`.", "",
              "Training curves: `runs/<phase>/report/summary.md` and `curves.png` for "
              "teacher-sft, student-cold-start, student-dgrpo. Per-model answers: "
              "`eval/<model>/heldout/predictions.jsonl`.", "",
              "| phase | seconds |", "|---|---:|"]
    lines += [f"| {phase} | {seconds:.0f} |" for phase, seconds in summary["seconds"].items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ command


def run_quickstart(args: argparse.Namespace) -> int:
    from rich.console import Console

    from megatron_dgrpo.data.chat import IM_END
    from megatron_dgrpo.outputs import refuse_existing
    from megatron_dgrpo.parallel.launch import run_distributed
    from megatron_dgrpo.recipe import HeldOut, evaluate_models, model_dir, run_config, train_phase

    plan, plan_name = (SHORT, "short") if args.short else (FULL, "full")
    console = Console()
    out = Path(args.out)
    refuse_existing(out)
    out.mkdir(parents=True)
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    def phase(name: str, text: str):
        console.rule(f"[bold]{name}[/]: {text}")
        seconds[name] = time.perf_counter()

    def done(name: str) -> None:
        seconds[name] = time.perf_counter() - seconds[name]
        console.print(f"[green]{name} done[/] in {seconds[name]:.0f} s")

    phase("data", f"tokenizer, {plan.train_examples} training and {plan.heldout_examples} "
                  f"held-out tasks ({', '.join(QUICKSTART_TASKS)})")
    assets = make_assets(out, plan, args.seed)
    done("data")

    runs = out / "runs"
    sft = {"loss": {"objective": "sft"}, "optim": {"lr": plan.sft_lr},
           "prompts_per_step": plan.sft_prompts_per_step}
    teacher_run, cold_run, dgrpo_run = runs / "teacher-sft", runs / "student-cold-start", runs / "student-dgrpo"

    phase("teacher", f"SFT of {TEACHER_PRESET} for {plan.teacher_sft_steps} steps")
    data = (assets["tokenizer"], assets["train"], args.tp)
    train_phase(run_config(teacher_run, *data, args.seed, student={"preset": TEACHER_PRESET},
                           steps=plan.teacher_sft_steps, save_every=plan.teacher_sft_steps,
                           **sft), args.tp)
    done("teacher")

    phase("cold start", f"SFT of {STUDENT_PRESET} for {plan.cold_start_steps} steps")
    train_phase(run_config(cold_run, *data, args.seed + 1, student={"preset": STUDENT_PRESET},
                           steps=plan.cold_start_steps, save_every=plan.cold_start_steps,
                           **sft), args.tp)
    done("cold start")

    teacher_ckpt = model_dir(teacher_run, plan.teacher_sft_steps)
    cold_ckpt = model_dir(cold_run, plan.cold_start_steps)
    phase("dgrpo", f"dGRPO of the student for {plan.dgrpo_steps} steps, teacher as the anchor")
    train_phase(run_config(
        dgrpo_run, *data, args.seed + 2,
        student={"preset": None, "init_from": str(cold_ckpt)},
        teacher={"preset": None, "init_from": str(teacher_ckpt)},
        loss={"objective": "dgrpo", "kl_coef": plan.kl_coef},
        sampling={"n": plan.group_size, "temperature": plan.temperature,
                  "max_new_tokens": plan.max_new_tokens,
                  "stop_strings": [IM_END]},
        optim={"lr": plan.dgrpo_lr}, prompts_per_step=plan.dgrpo_prompts_per_step,
        steps=plan.dgrpo_steps, save_every=plan.eval_every), args.tp)
    done("dgrpo")

    phase("eval", "greedy answers on the held-out set: teacher, student through dGRPO")
    eval_steps = list(range(plan.eval_every, plan.dgrpo_steps + 1, plan.eval_every))
    models = [("teacher", str(teacher_ckpt)), ("student-step-0", str(cold_ckpt))]
    models += [(f"student-step-{s}", str(model_dir(dgrpo_run, s))) for s in eval_steps]
    held_out = HeldOut("heldout", str(assets["heldout"]), str(assets["train"]), plan.max_new_tokens)
    scored = run_distributed(evaluate_models, 1, args=(models, str(assets["tokenizer"]),
                                                       [held_out], str(out / "eval")),
                             timeout_s=3600)[0]
    heldout = {label: {**sets["heldout"]["families"], "all": sets["heldout"]["all"]}
               for label, sets in scored.items()}
    done("eval")

    curve = [(0, heldout["student-step-0"]["all"])]
    curve += [(s, heldout[f"student-step-{s}"]["all"]) for s in eval_steps]
    summary = {"plan_name": plan_name, "plan": dataclasses.asdict(plan), "tensor_parallel": args.tp,
               "heldout": heldout, "teacher": heldout["teacher"]["all"],
               "student_before": curve[0][1], "student_after": curve[-1][1],
               "learning": curve[-1][1] > curve[0][1], "curve": curve}
    seconds["total"] = time.perf_counter() - started
    summary["seconds"] = seconds
    _plot_heldout(curve, summary["teacher"], out / "heldout_reward.png")
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(_report_markdown(summary))
    console.print(_report_markdown(summary))
    console.print(f"[bold]report:[/] {out / 'report.md'}")
    return 0
