"""Where our step's time goes, phase by phase and op by op, on an ``e2e_step.py`` workload.

Builds the same assets and run configuration as ``benchmarks/e2e_step.py`` (same models,
prompts and shapes), runs our ``Trainer`` in this process (TP=1), and times each phase of
every step with explicit timers around the functions that do it:

- ``rollout/prefill``: the engine's forwards over more than one token per row (the prompts);
- ``rollout/decode``: its one-token forwards;
- ``rollout/other``: the rest of the rollout phase (sampling, KV-cache copies, rewards);
- ``scoring``: the trainer's scoring phase (reference / ``pi_old`` log-probs; none here);
- ``train/teacher_forward``: the teacher's forward (dGRPO);
- ``train/student_forward``: the student's forward to its final hidden states;
- ``train/loss``: the fused loss (its forward also does the output layer's backward);
- ``train/backward``: ``backward()`` through the model;
- ``train/optimizer``: the optimizer step (Adam, gradient buffers);
- ``train/other``: the rest of the training phase.

Reported: the median over the measured steps (the first step is a warm-up) of each phase's
seconds, and, for one extra step run under ``torch.profiler``, the operators with the most
self CPU time (the profiler's own overhead inflates the many small decode operators, so read
that table for shares, the timers for seconds). The 1-minute load average is recorded with
each run. ``--out X.json`` appends the run to that file (a list of runs) and rewrites
``X.md`` beside it from all of them.

    .venv/bin/python benchmarks/e2e_profile.py --workload long --objective grpo --label before \\
        --out benchmarks/results/e2e_profile_2026-12-01.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
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
)
from trl_step import answer_length_parity

PHASES = ("rollout/prefill", "rollout/decode", "rollout/other", "scoring",
          "train/teacher_forward", "train/student_forward", "train/loss", "train/backward",
          "train/optimizer", "train/other", "step")
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
    """Time the engine's forwards, the student's forward, the loss, backward and the
    optimizer step of ``trainer``."""
    from megatron_dgrpo.models import provider
    from megatron_dgrpo.rollout.embedded import EmbeddedEngine
    from megatron_dgrpo.train import loop

    timer.wrap(EmbeddedEngine, "_logits", lambda self, tokens, *_a, **_k: (
        "rollout/prefill" if tokens.shape[1] > 1 else "rollout/decode"))
    timer.wrap(provider, "loss_inputs", lambda *_a, **_k: (
        "train/student_forward" if torch.is_grad_enabled() else "train/teacher_forward"))
    timer.wrap(loop, "loss_from_hidden", lambda *_a, **_k: "train/loss")
    timer.wrap(torch.Tensor, "backward", lambda *_a, **_k: "train/backward")
    timer.wrap(trainer.optim, "step", lambda *_a, **_k: "train/optimizer")


def step_phases(timer: PhaseTimer, metrics: dict[str, float], seconds: float) -> dict:
    """This step's phases (seconds) from the timers and the trainer's own phase metrics."""
    phases = {name: timer.seconds.get(name, 0.0) for name in PHASES}
    phases["rollout/other"] = (metrics["time/rollout_s"] - phases["rollout/prefill"]
                               - phases["rollout/decode"])
    phases["scoring"] = metrics["time/scoring_s"]
    phases["train/other"] = metrics["time/train_s"] - sum(
        phases[name] for name in PHASES if name.startswith("train/") and name != "train/other")
    phases["step"] = seconds
    return phases


def profile(args: argparse.Namespace) -> dict:
    """Run the workload's steps in this process; the run's record (see the module doc)."""
    from megatron_dgrpo.config import from_dict
    from megatron_dgrpo.data.rewards import register_reward
    from megatron_dgrpo.train.config import RunConfig
    from megatron_dgrpo.train.loop import Trainer

    torch.set_num_threads(args.threads)
    register_reward(REWARD_NAME)(answer_length_parity)
    with tempfile.TemporaryDirectory(prefix="e2e_profile_") as tmp:
        root = Path(tmp)
        args.steps += 1  # data and schedule for one more step, run under torch.profiler
        paths = prepare_assets(root, args)
        config = run_config(paths, args, args.objective, str(root / "run"))
        args.steps -= 1
        trainer = Trainer(from_dict(RunConfig, config))
        timer = PhaseTimer()
        instrument(timer, trainer)
        steps = []
        for _ in range(args.steps + 1):
            timer.seconds.clear()
            start = time.perf_counter()
            metrics = trainer.train_step()
            steps.append(step_phases(timer, metrics, time.perf_counter() - start))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            trainer.train_step()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    return {
        "label": args.label, "workload": args.workload, "objective": args.objective,
        "shape": f"{args.prompts} prompts x G={args.group} x {args.new_tokens} new tokens",
        "threads": args.threads, "steps": args.steps, "load": os.getloadavg()[0],
        "phases": {name: statistics.median(s[name] for s in steps[1:]) for name in PHASES},
        "top_ops": [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6,
                     "share": e.self_cpu_time_total / total, "calls": e.count}
                    for e in ops[:TOP_OPS]],
    }


def markdown(runs: list[dict]) -> str:
    """Every run: the phase table (one column per run), then each run's top operators."""
    lines = ["# Our step, phase by phase (`benchmarks/e2e_profile.py`)", "",
             "Median seconds over the measured steps (after one warm-up), 2 torch threads, "
             "TP=1, fp32, on the shared 2-core machine under load from other jobs (load "
             "average in the table: wall seconds stretch with it, so compare shares).", ""]
    heads = [f"{r['label']}: {r['workload']} {r['objective']}" for r in runs]
    lines += ["| phase | " + " | ".join(heads) + " |", "|---" * (len(runs) + 1) + "|"]
    for name in PHASES:
        lines.append(f"| {name} | " + " | ".join(
            f"{r['phases'][name]:.2f} ({r['phases'][name] / r['phases']['step']:.0%})"
            for r in runs) + " |")
    lines.append("| load average | " + " | ".join(f"{r['load']:.1f}" for r in runs) + " |")
    for run, head in zip(runs, heads):
        lines += ["", f"## {head} ({run['shape']}): operators by self CPU time "
                  "(one profiled step)", "", "| op | self CPU s | share | calls |",
                  "|---|---:|---:|---:|"]
        lines += [f"| `{o['op']}` | {o['self_cpu_s']:.2f} | {o['share']:.1%} | {o['calls']} |"
                  for o in run["top_ops"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(parser)
    parser.add_argument("--objective", choices=("grpo", "dgrpo"), default="grpo")
    parser.add_argument("--label", default="run", help="names the run in the tables")
    parser.add_argument("--out", help="JSON file to append the run to (and X.md beside it)")
    args = resolve_workload(parser.parse_args())
    if args.tp != 1:
        parser.error("e2e_profile.py runs our trainer in-process: --tp 1 only")
    run = profile(args)
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
