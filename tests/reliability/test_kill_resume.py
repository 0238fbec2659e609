"""``kill -9`` at random points of a training run, and inside its checkpoint writes: one lineage
per layout (kill, restart, kill again, ...), compared once with an uninterrupted run.

Single rank: 20 kills after a random delay from the process start (start-up, resume, steps,
checkpoint writes: wherever the delay lands) and 4 kills inside the checkpoint write
(``DGRPO_FAULT_INJECT``: after the rank files, after ``trainer_state.json``, after the
rename, mid-prune). TP=2: 6 kills of both ranks at random delays, one of one rank at a
random delay, and one rank killed inside a checkpoint write; the other rank must then exit
by itself, with ``PeerLostError`` on its stderr, within 60 s.

After every kill: each checkpoint that looks complete (``trainer_state.json``) holds exactly
the uninterrupted run's checkpoint of that step (every tensor bit for bit, all metadata: a
half-written one never looks complete), and the restart resumes from the checkpoint
``latest`` names (the newest complete one if it names none). At the end the lineage's
metrics (timings aside) and final checkpoint (weights, Adam state, RNG) equal the
uninterrupted run's exactly. The first segment of each lineage is
a real ``dgrpo train`` (``python -m megatron_dgrpo.cli``, under ``torch.distributed.run`` for
TP=2); the others are forked from a pre-imported server, which starts them in a second.
"""

from __future__ import annotations

import functools
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from reliability_helpers import checkpoint_contents, log_text

from megatron_dgrpo.parallel.launch import free_port
from megatron_dgrpo.train.metrics import read_metrics

pytestmark = [pytest.mark.reliability, pytest.mark.multiproc]

NON_DETERMINISTIC = ("time", "time/", "throughput/", "memory/")
SURVIVOR_LIMIT_S = 60.0  # a rank whose peer died must be gone by then
TARGETED = ("checkpoint.rank_files", "checkpoint.state", "checkpoint.renamed",
            "checkpoint.pruning")


def _comparable(run_dir) -> list[dict]:
    return [{k: v for k, v in record.items() if not k.startswith(NON_DETERMINISTIC)}
            for record in read_metrics(run_dir)]


def _complete_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*")
                  if (p / "trainer_state.json").is_file())


def _last_good(run_dir: Path) -> int | None:
    """The checkpoint a restart must resume from: the one ``latest`` names if that one is
    complete, else the newest complete one."""
    pointer, complete = run_dir / "checkpoints" / "latest", _complete_steps(run_dir)
    if pointer.is_file():
        named = pointer.read_text().strip()
        if named.startswith("step_") and int(named[5:]) in complete:
            return int(named[5:])
    return complete[-1] if complete else None


def _resumed_step(log: str) -> int | None:
    found = re.findall(r"resuming .* from .*step_\d+ \(step (\d+)\)", log)
    return int(found[-1]) if found else None


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it, and wait until they are gone. Its process
    group is not enough: torchrun starts each rank in a session of its own, so a rank would
    outlive its killed launcher and go on writing checkpoints."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in tree:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree[1:], timeout=30)  # the root is reaped by its Popen


@dataclass
class Run:
    """One segment of a lineage: the rank processes (forked) or a launcher subprocess."""

    processes: list
    logs: list[Path]
    started: float

    def kill(self, ranks=None) -> None:
        for index, process in enumerate(self.processes):
            if ranks is None or index in ranks:
                if isinstance(process, subprocess.Popen):
                    _kill_tree(process.pid)  # torchrun and its ranks
                else:
                    process.kill()

    def wait(self, timeout: float) -> list[int | None]:
        deadline = time.monotonic() + timeout
        for process in self.processes:
            left = max(0.0, deadline - time.monotonic())
            if isinstance(process, subprocess.Popen):
                try:
                    process.wait(left)
                except subprocess.TimeoutExpired:
                    pass
            else:
                process.join(left)
        return [p.poll() if isinstance(p, subprocess.Popen) else p.exitcode
                for p in self.processes]

    def exits(self, timeout: float) -> tuple[list[int | None], float]:
        """Wait up to ``timeout`` s for every process; (exit codes, seconds from the first
        exit to the last: how long the other ranks outlived the first to die)."""
        deadline, first, last = time.monotonic() + timeout, None, None
        while time.monotonic() < deadline:
            codes = self.wait(0)
            now = time.monotonic()
            if first is None and any(c is not None for c in codes):
                first = now
            if None not in codes:
                last = now
                break
            time.sleep(0.02)
        return self.wait(0), (last or time.monotonic()) - (first or time.monotonic())

    def log(self) -> str:
        return "\n".join(log_text(path) for path in self.logs)


class Lineage:
    """Starts segments of one run (``world`` ranks) from ``config``; ``name`` tags the logs."""

    def __init__(self, launcher, config: Path, world: int, logs: Path):
        self.launcher, self.config, self.world, self.logs = launcher, config, world, logs
        self.segments = 0

    def start(self, overrides: list[str], fault: str | None = None,
              real_cli: bool = False) -> Run:
        self.segments += 1
        argv = ["train", "--config", str(self.config), "--no-progress", *overrides]
        logs = [self.logs / f"segment{self.segments:02d}-rank{r}.log" for r in range(self.world)]
        fault_env = {"DGRPO_FAULT_INJECT": fault} if fault else {}
        started = time.monotonic()
        if real_cli:
            launch = [sys.executable, "-m", "megatron_dgrpo.cli"] if self.world == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                str(self.world), "--master-port", str(free_port()), "-m", "megatron_dgrpo.cli"]
            with open(logs[0], "w") as out:
                process = subprocess.Popen(
                    [*launch, *argv], stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env={**os.environ, "OMP_NUM_THREADS": "1", **fault_env})
            return Run([process], logs[:1], started)
        port = str(free_port())
        processes = []
        for rank in range(self.world):
            env = dict(fault_env)
            if self.world > 1:
                env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(self.world),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            processes.append(self.launcher.start(argv, logs[rank], env))
        return Run(processes, logs, started)


def _reference(lineage: Lineage, run_dir: Path, steps: int) -> tuple[float, float]:
    """Run the uninterrupted reference; returns (seconds to its first checkpoint, seconds per
    further step), the scale of the random kill delays."""
    run = lineage.start([f"run_dir={run_dir}", f"steps={steps}", f"keep_last={steps}"])
    first = None
    while None in run.wait(0.05):
        if first is None and _complete_steps(run_dir):
            first = time.monotonic() - run.started
    assert run.wait(0) == [0] * lineage.world, run.log()[-3000:]
    total = time.monotonic() - run.started
    return first or total, (total - (first or total)) / max(1, steps - 1)


@functools.cache
def _contents(checkpoint: Path) -> dict[str, str]:
    return checkpoint_contents(checkpoint)  # of the reference's, which do not change


def _check_checkpoints(run_dir: Path, reference: Path) -> list[int]:
    """Every complete-looking checkpoint equals the reference's of its step; returns them."""
    steps = _complete_steps(run_dir)
    for step in steps:
        name = f"checkpoints/step_{step:08d}"
        assert checkpoint_contents(run_dir / name) == _contents(reference / name), name
    return steps


def _run_lineage(lineage: Lineage, run_dir: Path, reference: Path, plan: list[tuple],
                 steps: int, scale: tuple[float, float], seed: int) -> list[str]:
    """Run ``plan``: entries ``("random", ranks)`` (SIGKILL ``ranks``, all if None, after a
    random delay) or ``(point, rank)`` (the fault hook kills ``rank`` inside the next save).
    Then run to the end. Returns one line per fault, what was injected and what survived."""
    rng = random.Random(seed)
    first, per_step = scale
    overrides = [f"run_dir={run_dir}", f"steps={steps}"]
    report = []
    for index, (kind, ranks) in enumerate(plan):
        expected = _last_good(run_dir)
        left = steps - (expected or 0)
        if kind == "random":
            # into the steps and saves, or, when the run is ahead of the plan (it must not
            # finish before its last planned kill), into start-up and resume
            real_cli = index == 0
            start_up = first + (lineage.launcher.warmup_s if real_cli else 0.0)  # + imports
            ahead = left - 2 <= 0.5 * sum(k == "random" for k, _ in plan[index:])
            delay = rng.uniform(0.1 * start_up, 0.7 * start_up) if ahead else \
                rng.uniform(0.3 * start_up, start_up + 2 * per_step)
            run = lineage.start(overrides, real_cli=real_cli)
            while time.monotonic() - run.started < delay and None in run.wait(0):
                time.sleep(0.01)
            run.kill(ranks)
            what = f"SIGKILL {'all ranks' if ranks is None else f'rank {ranks[0]}'} at " \
                   f"{delay:.2f} s"
        else:
            step = (expected or 0) + 1
            run = lineage.start(overrides, fault=f"{kind}@{step}:{ranks}")
            what = f"SIGKILL rank {ranks} at {kind} of step {step}"
        codes, outlived = run.exits(SURVIVOR_LIMIT_S + 60)
        log = run.log()
        assert None not in codes, f"{what}: ranks still running: {codes}\n{log[-3000:]}"
        assert 0 not in codes, f"{what}: the run finished before the fault\n{log[-2000:]}"
        survivor = ""
        if lineage.world > 1 and (kind != "random" or ranks is not None):
            # the other rank exits by itself, naming the lost peer
            assert outlived < SURVIVOR_LIMIT_S, f"{what}: the other rank took {outlived:.0f} s"
            assert codes.count(1) == 1, f"{what}: exit codes {codes}"
            assert "PeerLostError" in log and "lost contact with the other ranks" in log, \
                log[-3000:]
            survivor = f", the other rank exited 1 with PeerLostError {outlived:.1f} s later"
        resumed = _resumed_step(log)  # None: killed before it got there
        assert resumed in (expected, None), f"{what}: resumed from step {resumed}, not {expected}"
        kept = _check_checkpoints(run_dir, reference)
        began = ("a fresh start" if expected is None else "killed before resuming"
                 if resumed is None else f"resumed from step {expected}")
        report.append(f"{what} ({began}){survivor}; complete checkpoints {kept} hold the "
                      "reference's")
    expected = _last_good(run_dir)
    run = lineage.start(overrides)
    codes = run.wait(300)
    assert codes == [0] * lineage.world, run.log()[-3000:]
    assert _resumed_step(run.log()) == expected
    return report


def _assert_same_as_reference(run_dir: Path, reference: Path, steps: int) -> None:
    assert _comparable(run_dir) == _comparable(reference)
    final = f"checkpoints/step_{steps:08d}"
    assert checkpoint_contents(run_dir / final) == checkpoint_contents(reference / final)
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def _lineage_test(launcher, synth_assets, tmp_path, ledger, world, steps, plan, seed):
    config = synth_assets.write_config(tmp_path / "run.yaml", tmp_path / "unused",
                                       parallel={"tensor_parallel": world, "timeout_s": 20.0})
    lineage = Lineage(launcher, config, world, tmp_path)
    reference, run_dir = tmp_path / "reference", tmp_path / "lineage"
    scale = _reference(lineage, reference, steps)
    report = []
    try:
        report = _run_lineage(lineage, run_dir, reference, plan, steps, scale, seed)
        _assert_same_as_reference(run_dir, reference, steps)
    finally:
        ledger.count("fault", held=len(report) == len(plan), cases=len(plan))
        print(f"\nTP={world}: {len(plan)} faults injected, {len(report)} survived "
              f"(reference: first checkpoint after {scale[0]:.1f} s, {scale[1]:.2f} s/step)")
        print("\n".join(report))


def test_single_rank_lineage_survives_24_kills(launcher, synth_assets, tmp_path, ledger):
    plan = [("random", None)] * 20
    for slot, point in zip((2, 7, 12, 17), TARGETED):
        plan.insert(slot, (point, 0))
    _lineage_test(launcher, synth_assets, tmp_path, ledger, world=1, steps=20, plan=plan,
                  seed=18)


def test_tp2_lineage_survives_kills_of_one_and_both_ranks(launcher, synth_assets, tmp_path,
                                                         ledger):
    plan = [("random", None), ("random", None), ("checkpoint.rank_files", 1),
            ("random", None), ("random", [1]), ("random", None), ("checkpoint.state", 0),
            ("random", None), ("random", None)]
    _lineage_test(launcher, synth_assets, tmp_path, ledger, world=2, steps=8, plan=plan,
                  seed=2)
