"""Where our step's time goes, phase by phase, against a plain-PyTorch step in the same run.

Builds the same assets and run configuration as ``benchmarks/e2e_step.py`` (same models,
prompts and shapes), runs our ``Trainer`` in this process (TP=1, the embedded engine) and,
after each of its steps, the same step written the direct way with ``transformers`` models of
the same weights (``benchmarks/phase_baseline.py``, on the same prompts). Our phases are
timed with explicit timers around the functions that do them:

- ``rollout``: the trainer's rollout phase (engine prefill and decode, sampling, rewards;
  split into ``rollout/prefill`` = forwards over more than one token per row,
  ``rollout/decode`` = one-token forwards, ``rollout/other`` in the JSON);
- ``refit``: the sequence source's ``after_step`` (the embedded engine samples from the
  live weights: nothing to do, where the baseline copies the weights);
- ``scoring``: the trainer's scoring phase (reference / ``pi_old`` log-probs; none here);
- ``teacher``: the teacher's forward to its final hidden states (dGRPO);
- ``loss/backward``: the student's forward, the fused loss (output layers, softmax, KL and
  their backward) and ``backward()`` through the model;
- ``optimizer``: the optimizer step (Adam, gradient buffers);
- ``other``: the rest of the step.

Reported: per phase, the median over the measured steps (the first step of each side is a
warm-up) of ours, of the baseline, and ours / baseline (below 1: ours faster). ``--ops``
runs one more step of ours under ``torch.profiler`` and adds the operators with the most self
CPU time (the profiler's overhead inflates the many small decode operators: read that table
for shares, the timers for seconds). The 1-minute load average is recorded with each run.
``--out X.json`` appends the run to that file (a list of runs) and rewrites ``X.md`` beside
it from all of them.

    .venv/bin/python benchmarks/e2e_profile.py --workload long --objective dgrpo --label run \\
        --out benchmarks/results/e2e_profile_2026-12-01.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from e2e_step import (
    REWARD_NAME,
    add_workload_arguments,
    prepare_assets,
    resolve_workload,
    run_config,
    step_prompts,
)
from phase_baseline import BASELINE_PHASES, PlainStep
from trl_step import answer_length_parity

PHASES = (*BASELINE_PHASES, "other", "step")
ROLLOUT_PARTS = ("rollout/prefill", "rollout/decode", "rollout/other")
# Our timed functions' phases; loss/backward sums the student's forward, the loss, backward.
LOSS_BACKWARD = ("train/student_forward", "train/loss", "train/backward")
TOP_OPS = 15


class PhaseTimer:
    """Seconds spent in named phases; :meth:`wrap` times every call of a function."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, owner, name: str, phase_of) -> None:
        """Replace ``owner.name`` by a timed version; ``phase_of(*args, **kwargs)`` names
        the phase of a call."""
        function = getattr(owner, name)

        @functools.wraps(function)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[phase_of(*args, **kwargs)] += time.perf_counter() - start

        setattr(owner, name, timed)


def instrument(timer: PhaseTimer, trainer) -> None:
    """Time the engine's forwards, the teacher's and the student's forwards, the loss,
    backward, the optimizer step and the sequence source's refit of ``trainer``."""
    from megatron_dgrpo.models import provider
    from megatron_dgrpo.rollout.embedded import EmbeddedEngine
    from megatron_dgrpo.train import loop

    timer.wrap(EmbeddedEngine, "_logits", lambda self, tokens, *_a, **_k: (
        "rollout/prefill" if tokens.shape[1] > 1 else "rollout/decode"))
    timer.wrap(provider, "loss_inputs", lambda *_a, **_k: (
        "train/student_forward" if torch.is_grad_enabled() else "teacher"))
    timer.wrap(loop, "loss_from_hidden", lambda *_a, **_k: "train/loss")
    timer.wrap(torch.Tensor, "backward", lambda *_a, **_k: "train/backward")
    timer.wrap(trainer.optim, "step", lambda *_a, **_k: "optimizer")
    timer.wrap(trainer.sequences, "after_step", lambda *_a, **_k: "refit")


def our_phases(timer: PhaseTimer, metrics: dict[str, float], seconds: float) -> dict:
    """Our step's phases (seconds) from the timers and the trainer's own phase metrics."""
    phases = {"rollout": metrics["time/rollout_s"], "refit": timer.seconds["refit"],
              "scoring": metrics["time/scoring_s"], "teacher": timer.seconds["teacher"],
              "loss/backward": sum(timer.seconds[name] for name in LOSS_BACKWARD),
              "optimizer": timer.seconds["optimizer"]}
    phases.update(other=seconds - sum(phases.values()), step=seconds,
                  **{name: timer.seconds[name] for name in ROLLOUT_PARTS[:2]})
    phases["rollout/other"] = phases["rollout"] - phases["rollout/prefill"] - phases[
        "rollout/decode"]
    return phases


def baseline_phases(baseline: PlainStep, prompts: list[list[int]],
                    args: argparse.Namespace) -> dict:
    """The baseline's step on ``prompts``: its phases (seconds), other and step."""
    start = time.perf_counter()
    phases = baseline.step(prompts, args.group, args.new_tokens)
    seconds = time.perf_counter() - start
    phases.update(other=seconds - sum(phases.values()), step=seconds)
    return phases


def medians(steps: list[dict]) -> dict[str, float]:
    """Per phase, the median over the measured steps (``steps[0]`` is the warm-up)."""
    return {name: statistics.median(s[name] for s in steps[1:]) for name in steps[0]}


def profile(rank: int, world_size: int, args: argparse.Namespace) -> dict:
    """Run the workload's steps, ours and the baseline's in turn, in this process (the one
    rank of ``run_distributed``); the run's record (see the module doc)."""
    from megatron_dgrpo.config import from_dict
    from megatron_dgrpo.data.chat import load_chat_tokenizer
    from megatron_dgrpo.data.rewards import register_reward
    from megatron_dgrpo.train.config import RunConfig
    from megatron_dgrpo.train.loop import Trainer

    torch.set_num_threads(args.threads)
    register_reward(REWARD_NAME)(answer_length_parity)
    extra = int(args.ops)  # data and schedule for one more step, run under torch.profiler
    with tempfile.TemporaryDirectory(prefix="e2e_profile_") as tmp:
        root = Path(tmp)
        args.steps += extra
        paths = prepare_assets(root, args)
        config = run_config(paths, args, args.objective, str(root / "run"))
        prompts = step_prompts(paths, args)
        args.steps -= extra
        trainer = Trainer(from_dict(RunConfig, config))
        baseline = PlainStep(paths["student_hf"],
                             paths["teacher_hf"] if args.objective == "dgrpo" else None,
                             lambda text: answer_length_parity(text, ""),
                             load_chat_tokenizer(paths["tokenizer"]).decode, args.lr,
                             config["loss"]["kl_coef"])
        timer = PhaseTimer()
        instrument(timer, trainer)
        ours, theirs = [], []
        expected = args.prompts * args.group * args.new_tokens
        for index in range(args.steps + 1):  # the side that goes first alternates
            if index % 2:
                theirs.append(baseline_phases(
                    baseline, prompts[index * args.prompts:(index + 1) * args.prompts], args))
            timer.seconds.clear()
            start = time.perf_counter()
            metrics = trainer.train_step()
            ours.append(our_phases(timer, metrics, time.perf_counter() - start))
            generated = round(metrics["response/length_mean"] * args.prompts * args.group)
            if generated != expected:
                raise RuntimeError(f"our step generated {generated} tokens, not {expected}: "
                                   "the sides would not do the same work")
            if not index % 2:
                theirs.append(baseline_phases(
                    baseline, prompts[index * args.prompts:(index + 1) * args.prompts], args))
        top_ops = []
        if args.ops:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                trainer.train_step()
            ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            total = sum(e.self_cpu_time_total for e in ops)
            top_ops = [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6,
                        "share": e.self_cpu_time_total / total, "calls": e.count}
                       for e in ops[:TOP_OPS]]
    lengths = [len(p) for p in prompts]
    return {
        "label": args.label, "command": args.command, "workload": args.workload,
        "objective": args.objective,
        "shape": (f"{args.prompts} prompts x G={args.group} x {args.new_tokens} new tokens, "
                  f"prompts of {min(lengths)}-{max(lengths)} tokens"),
        "threads": args.threads, "steps": args.steps, "load": os.getloadavg()[0],
        "ours": medians(ours), "baseline": medians(theirs),
        "per_step": {"ours": ours, "baseline": theirs}, "top_ops": top_ops,
    }


def ratio(ours: float, baseline: float) -> str:
    """``ours / baseline`` as text; a dash where the baseline has no such work."""
    return f"{ours / baseline:.2f}x" if baseline > 1e-6 else "-"


RATIO_ROWS = (*BASELINE_PHASES, "step")  # "other" is bookkeeping on both sides: no ratio


def markdown(runs: list[dict]) -> str:
    """Per run: the phase table (ours, baseline, ratio), then its top operators if any."""
    lines = ["# Our step, phase by phase, vs a plain-PyTorch step "
             "(`benchmarks/e2e_profile.py`)", "",
             "Median seconds over the measured steps (after one warm-up each), TP=1, fp32, "
             "same process, ours and the baseline (`benchmarks/phase_baseline.py`: "
             "`transformers` models of the same weights, `generate`, AdamW) alternating step "
             "by step on the same prompts. Ratio = ours / baseline (below 1: ours faster). "
             "The machine is a shared 2-core box: other jobs ran beside these runs (load "
             "average in each table), which stretches wall seconds on both sides alike only "
             "roughly; read the ratios, not the seconds. Rows: `teacher` is the teacher's "
             "forward to its final hidden states on both sides (its output layer is in "
             "`loss/backward`); `refit` is nothing on our side (the embedded engine samples "
             "from the live weights) and a copy of the weights on the baseline's; `scoring` "
             "is empty on both (no reference model, one update per rollout batch).", ""]
    for run in runs:
        ours, base = run["ours"], run["baseline"]
        lines += [f"## {run['label']}: {run['workload']} {run['objective']} ({run['shape']}; "
                  f"{run['steps']} measured steps, {run['threads']} torch threads, load "
                  f"average {run['load']:.1f})", "",
                  f"    {run['command']}", "",
                  "| phase | ours s | baseline s | ours / baseline |", "|---|---:|---:|---:|"]
        for name in PHASES:
            shown = ratio(ours[name], base[name]) if name in RATIO_ROWS else ""
            lines.append(f"| {name} | {ours[name]:.3f} | {base[name]:.3f} | {shown} |")
            if name == "rollout":
                lines += [f"| &nbsp; {part} | {ours[part]:.3f} | | |" for part in ROLLOUT_PARTS]
        if run["top_ops"]:
            lines += ["", "Our operators by self CPU time (one profiled step):", "",
                      "| op | self CPU s | share | calls |", "|---|---:|---:|---:|"]
            lines += [f"| `{o['op']}` | {o['self_cpu_s']:.2f} | {o['share']:.1%} | "
                      f"{o['calls']} |" for o in run["top_ops"]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(parser)
    parser.add_argument("--objective", choices=("grpo", "dgrpo"), default="dgrpo")
    parser.add_argument("--label", default="run", help="names the run in the tables")
    parser.add_argument("--ops", action="store_true",
                        help="profile one more step of ours: its top operators")
    parser.add_argument("--out", help="JSON file to append the run to (and X.md beside it)")
    args = resolve_workload(parser.parse_args())
    args.command = "python benchmarks/e2e_profile.py " + " ".join(sys.argv[1:])
    if args.tp != 1:
        parser.error("e2e_profile.py runs our trainer in-process: --tp 1 only")
    if args.out and not Path(args.out).parent.is_dir():
        parser.error(f"--out {args.out}: directory {Path(args.out).parent} does not exist")
    from megatron_dgrpo.parallel.launch import run_distributed

    run = run_distributed(profile, 1, args=(args,), timeout_s=3600.0)[0]
    runs = [run]
    if args.out:
        out = Path(args.out)
        runs = (json.loads(out.read_text()) if out.exists() else []) + [run]
        for path, text in ((out, json.dumps(runs, indent=1) + "\n"),
                           (out.with_suffix(".md"), markdown(runs))):
            partial = path.with_name(path.name + ".partial")
            partial.write_text(text)
            os.replace(partial, path)
    print(markdown(runs[-1:]))


if __name__ == "__main__":
    main()
