"""``tools/convert_checkpoint.py`` (same arguments as ``dgrpo convert``) end to end."""

from __future__ import annotations

import argparse
import runpy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_dgrpo.models.cli import parse_size

TOOL = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"


@pytest.fixture(scope="module")
def tool_main():
    return runpy.run_path(str(TOOL), run_name="convert_checkpoint")["main"]


def test_convert_reshard_and_back_through_the_command_line(hf_dirs, tmp_path, tool_main, capsys):
    hf_dir = hf_dirs[False]
    assert tool_main(["hf-to-megatron", "--hf", str(hf_dir), "--out", str(tmp_path / "m"),
                      "--tp", "2", "--pp", "2"]) == 0
    assert tool_main(["reshard", "--ckpt", str(tmp_path / "m"), "--out", str(tmp_path / "r"),
                      "--tp", "1", "--pp", "1"]) == 0
    assert tool_main(["megatron-to-hf", "--ckpt", str(tmp_path / "r"),
                      "--out", str(tmp_path / "hf"), "--max-shard-size", "200KB"]) == 0
    assert f"wrote {tmp_path / 'hf'}" in capsys.readouterr().out
    original = {k: v for f in hf_dir.glob("*.safetensors") for k, v in load_file(f).items()}
    back = {k: v for f in (tmp_path / "hf").glob("*.safetensors") for k, v in load_file(f).items()}
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_bad_input_exits_with_status_2_and_one_line(hf_dirs, tmp_path, tool_main, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    status = tool_main(["hf-to-megatron", "--hf", str(hf_dirs[True]),
                        "--out", str(tmp_path / "taken")])
    assert status == 2
    assert "error: output directory" in capsys.readouterr().err


def test_help_and_argument_errors(tool_main, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool_main(["--help"])
    assert exit_info.value.code == 0
    assert "hf-to-megatron" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        tool_main(["hf-to-megatron", "--hf", "x", "--out", "y", "--tp", "0"])
    assert "must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("200KB", 200_000),
                                        ("1MiB", 2**20), ("1234", 1234)])
def test_shard_sizes_parse(text, size):
    assert parse_size(text) == size


def test_bad_shard_size_is_refused():
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        parse_size("five gigs")
