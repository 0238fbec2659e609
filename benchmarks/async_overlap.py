"""Asynchronous rollouts on CPU: how much of the vLLM engine's sampling time the trainer hides.

The same GRPO run (``benchmarks/e2e_step.py``'s workload, models and prompts, vLLM engine)
twice, each in a fresh process: ``rollout.async_mode: sync`` (sample, then train) and
``one_step`` (the engine, in a process of its own, samples step n+1's batch while the
trainer trains on step n's). Engine and trainer are pinned to one core each: the trainer's
process to ``--trainer-cpu`` with one torch thread, the engine's worker threads to
``--engine-cpu`` (``VLLM_CPU_OMP_THREADS_BIND``). With sync the two alternate, so one core
works at a time; with one_step both can work at once.

Reported per mode, medians over the measured steps (after ``--warmup`` steps; the first
async step has nothing in flight yet): step seconds, seconds in the rollout phase (sync:
sampling; one_step: waiting for the batch in flight plus broadcasting it), refit seconds;
then the step-time ratio (sync / one_step) and the fraction of the synchronous rollout
time hidden, ``1 - rollout_s(one_step) / rollout_s(sync)``. ``--repeats N`` runs the two
modes N times in turn and prints every round.

    .venv/bin/python benchmarks/async_overlap.py --workload long --steps 5 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_step import (  # noqa: E402  (a sibling script, not a package)
    REWARD_NAME,
    add_workload_arguments,
    answer_length_parity,
    prepare_assets,
    resolve_workload,
    vllm_config,
)

MODES = ("sync", "one_step")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(parser)
    parser.set_defaults(workload="long", steps=5)
    parser.add_argument("--warmup", type=int, default=2,
                        help="steps before the measured ones (engine start, first batch)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the two modes")
    parser.add_argument("--trainer-cpu", type=int, default=1)
    parser.add_argument("--engine-cpu", type=int, default=0)
    parser.add_argument("--json", help="write every round's rows to this file")
    return resolve_workload(parser.parse_args())


def pinned_worker(rank: int, world_size: int, config_dict: dict, trainer_cpu: int) -> dict:
    """Run every step of ``config_dict`` on one core; per-step wall and phase seconds."""
    import torch

    from megatron_dgrpo.config import from_dict
    from megatron_dgrpo.data.rewards import register_reward
    from megatron_dgrpo.train.config import RunConfig
    from megatron_dgrpo.train.loop import Trainer

    os.sched_setaffinity(0, {trainer_cpu})
    torch.set_num_threads(1)
    register_reward(REWARD_NAME)(answer_length_parity)
    trainer = Trainer(from_dict(RunConfig, config_dict))
    records = []
    for _ in range(trainer.config.steps):
        start = time.perf_counter()
        metrics = trainer.train_step()
        records.append({"step_s": time.perf_counter() - start,
                        "rollout_s": metrics["time/rollout_s"],
                        "refit_s": metrics.get("time/refit_s", 0.0),
                        "train_s": metrics["time/train_s"]})
    return {"steps": records}


def run_mode(paths: dict[str, str], args: argparse.Namespace, mode: str, run_dir: Path) -> dict:
    """One run of ``mode`` (``warmup + steps`` steps) in a fresh process; medians of its
    measured steps."""
    from megatron_dgrpo.parallel.launch import run_distributed

    config = vllm_config(paths, args, str(run_dir), async_mode=mode)
    config["steps"] = args.warmup + args.steps
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(args.engine_cpu)
    result = run_distributed(pinned_worker, 1, args=(config, args.trainer_cpu),
                             timeout_s=3600)[0]
    measured = result["steps"][args.warmup:]
    return {key: statistics.median(step[key] for step in measured)
            for key in ("step_s", "rollout_s", "refit_s", "train_s")}


def print_round(index: int, rows: dict[str, dict]) -> dict[str, float]:
    """The round's table and its two ratios."""
    print(f"\nround {index + 1}: median seconds per step")
    print("| mode | step s | rollout phase s | refit s | train s |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        r = rows[mode]
        print(f"| {mode} | {r['step_s']:.2f} | {r['rollout_s']:.2f} | {r['refit_s']:.2f} "
              f"| {r['train_s']:.2f} |")
    ratios = {"speedup": rows["sync"]["step_s"] / rows["one_step"]["step_s"],
              "hidden": 1.0 - rows["one_step"]["rollout_s"] / rows["sync"]["rollout_s"]}
    print(f"step time sync / one_step: {ratios['speedup']:.2f}x; rollout time hidden: "
          f"{100 * ratios['hidden']:.0f}%  (load average {os.getloadavg()[0]:.1f})")
    return ratios


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="async-overlap-") as tmp:
        root = Path(tmp)
        paths = prepare_assets(root, args)
        rounds = []
        for index in range(args.repeats):
            rows = {mode: run_mode(paths, args, mode, root / f"{mode}-{index}")
                    for mode in MODES}
            rounds.append({"rows": rows, "ratios": print_round(index, rows)})
    if args.repeats > 1:
        for key in ("speedup", "hidden"):
            values = sorted(r["ratios"][key] for r in rounds)
            print(f"{key}: median {statistics.median(values):.2f}, range "
                  f"{values[0]:.2f}-{values[-1]:.2f} over {len(values)} rounds")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
