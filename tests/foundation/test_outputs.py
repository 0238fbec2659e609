"""All-or-nothing output directories, single-process and written from several real ranks."""

import os

import pytest

from megatron_dgrpo.outputs import OutputExistsError, atomic_output_dir
from megatron_dgrpo.parallel.launch import run_distributed


def test_atomic_dir_appears_complete_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("crash mid-write")
    assert os.listdir(tmp_path) == []  # no output, no leftover temporary directory
    with atomic_output_dir(out) as tmp:
        (tmp / "done.txt").write_text("x")
    assert os.listdir(out) == ["done.txt"]


def test_empty_directory_is_reused_and_a_non_empty_one_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_output_dir(empty) as tmp:
        (tmp / "a").write_text("1")
    assert os.listdir(empty) == ["a"]
    with pytest.raises(OutputExistsError, match="already exists and is not empty"):
        with atomic_output_dir(empty):
            pass
    assert (empty / "a").read_text() == "1"


def _write(rank, world_size, out, failing_rank):
    from megatron_dgrpo.outputs import write_dir_from_all_ranks

    def write_rank_files(tmp):
        if rank == failing_rank:
            raise RuntimeError("disk full")
        (tmp / f"rank{rank}.txt").write_text(str(rank))

    def finalize(tmp):
        (tmp / "meta.json").write_text("{}")

    try:
        write_dir_from_all_ranks(out, write_rank_files, finalize)
    except OSError as exc:
        return str(exc)
    return None


@pytest.mark.multiproc
def test_collective_write_succeeds_together_or_fails_together(tmp_path):
    out = tmp_path / "ckpt"
    assert run_distributed(_write, 2, args=(str(out), None)) == [None, None]
    assert sorted(os.listdir(out)) == ["meta.json", "rank0.txt", "rank1.txt"]
    failed = tmp_path / "failed"
    messages = run_distributed(_write, 2, args=(str(failed), 1))
    assert all("rank 1: disk full" in m for m in messages)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # nothing of the failed write remains
