"""run_distributed: real gloo ranks, results by rank, failures carry the rank's traceback."""

import pytest
import torch
import torch.distributed as dist

from megatron_dgrpo.parallel.launch import DistributedWorkerError, run_distributed

pytestmark = pytest.mark.multiproc


def _sum_of_ranks(rank, world_size, scale):
    value = torch.tensor([float(rank) * scale])
    dist.all_reduce(value)
    return rank, world_size, value.item(), dist.get_backend()


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise AssertionError("rank one disagrees")
    return rank


def test_ranks_join_one_gloo_group_and_results_come_back_in_rank_order():
    results = run_distributed(_sum_of_ranks, 3, args=(2.0,))
    assert [r[0] for r in results] == [0, 1, 2]
    assert all(r[1] == 3 and r[3] == "gloo" for r in results)
    assert all(r[2] == 2.0 * (0 + 1 + 2) for r in results)


def test_a_failing_rank_is_reported_with_its_traceback():
    with pytest.raises(DistributedWorkerError, match="rank 1") as info:
        run_distributed(_fail_on_rank_one, 2)
    assert "rank one disagrees" in str(info.value)


def _die_on_rank_one(rank, world_size):
    import os

    if rank == 1:
        os._exit(3)  # no traceback, no result: a crash or a kill
    return rank


def test_a_rank_that_dies_without_reporting_is_named_with_its_exit_code():
    with pytest.raises(DistributedWorkerError, match="rank 1: exit code 3"):
        run_distributed(_die_on_rank_one, 2, timeout_s=600)


def test_a_script_without_a_main_guard_fails_instead_of_waiting(tmp_path):
    """The spawned rank re-imports the script, whose top level starts ranks again: the rank
    dies in bootstrapping. Before, the caller waited out its whole timeout."""
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text("from megatron_dgrpo.parallel.launch import run_distributed\n"
                      "def body(rank, world_size):\n    return rank\n"
                      "run_distributed(body, 1, timeout_s=3600)\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert "__main__" in result.stderr and "rank 0: exit code" in result.stderr


def _start_a_long_child(rank, world_size):
    import subprocess

    return subprocess.Popen(["sleep", "300"]).pid  # left running, like an engine process


def _alive(pid):
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a reaped-later zombie counts as gone
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_processes_a_rank_leaves_behind_are_ended_with_it():
    children = run_distributed(_start_a_long_child, 2)
    assert len(set(children)) == 2
    assert not any(_alive(pid) for pid in children)
