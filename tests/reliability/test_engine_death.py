"""A vLLM engine process killed in the middle of a run: ``dgrpo train`` with
``rollout.engine=vllm`` at DP=2 (one engine per replica, each in an engine-core child of its
rank's process) loses rank 0's engine to SIGKILL while its rollouts are being generated. Both
ranks must exit by themselves within 60 s, naming the error (NeMo-RL's chaos test allows
600 s): rank 0 retries the rollouts once and stops with ``RolloutError`` naming
``EngineDiedError``; rank 1 stops with it too (the retry decision is taken by all ranks) or
with ``PeerLostError``.
"""

from __future__ import annotations

import random
import signal
import time

import pytest
from reliability_helpers import log_text

from megatron_dgrpo.parallel.launch import free_port
from megatron_dgrpo.testing.cli_processes import kill_group
from megatron_dgrpo.train.metrics import read_metrics

# Extended tier (90 s): in the default run, tests/train/test_async_rollouts.py stops a run on a
# dying engine with EngineDiedError named, and tests/reliability/test_peer_timeout.py and the
# kill-resume lineages stop the surviving ranks with PeerLostError.
pytestmark = [pytest.mark.reliability, pytest.mark.vllm, pytest.mark.multiproc,
              pytest.mark.extended]

LIMIT_S = 60.0


def _engine_processes(pid: int) -> list:
    import psutil

    return [child for child in psutil.Process(pid).children(recursive=True)
            if "EngineCore" in " ".join(child.cmdline()) or "EngineCore" in child.name()]


@pytest.mark.reliability_case("fault")
def test_a_vllm_engine_killed_mid_generation_stops_both_ranks_with_a_named_error(
        launcher, synth_assets, tmp_path):
    run_dir = tmp_path / "run"
    config = synth_assets.write_config(
        tmp_path / "run.yaml", run_dir, steps=4, save_every=10, prompts_per_step=1,
        parallel={"tensor_parallel": 1, "timeout_s": 30.0},
        sampling={"n": 2, "max_new_tokens": 96, "temperature": 1.0},
        rollout={"engine": "vllm", "dtype": "float32", "verify_every": 0},
        data={"max_prompt_tokens": 2048})
    port, processes, logs = str(free_port()), [], []
    for rank in range(2):
        logs.append(tmp_path / f"rank{rank}.log")
        processes.append(launcher.start(
            ["train", "--config", str(config), "--no-progress"], logs[-1],
            {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}))
    try:
        deadline = time.monotonic() + 500
        while not read_metrics(run_dir):  # step 1 done: the engines run
            assert time.monotonic() < deadline and processes[0].exitcode is None, \
                log_text(logs[0])[-3000:]
            time.sleep(0.1)
        engines = _engine_processes(processes[0].pid)
        assert engines, "no vLLM engine-core process under rank 0"
        time.sleep(random.Random(7).uniform(0.0, 0.5))  # into step 2's generation
        for engine in engines:
            engine.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        for process in processes:
            process.join(max(0.0, killed + LIMIT_S - time.monotonic()))
        took = time.monotonic() - killed
        codes = [p.exitcode for p in processes]
    finally:
        for process in processes:
            kill_group(process)  # and any engine process left behind
    rank0, rank1 = log_text(logs[0]), log_text(logs[1])
    print(f"\nengine killed; ranks exited {codes} after {took:.1f} s")
    assert codes == [1, 1], (codes, rank0[-3000:], rank1[-3000:])
    assert took < LIMIT_S
    assert "dgrpo train: RolloutError: step 2: rollouts failed 2 times" in rank0, rank0[-3000:]
    assert "EngineDiedError: the vLLM engine process died during generate()" in rank0
    assert ("dgrpo train: RolloutError: step 2" in rank1
            or "dgrpo train: PeerLostError" in rank1), rank1[-3000:]
    assert "Traceback" not in rank0.split("dgrpo train: RolloutError")[-1]
