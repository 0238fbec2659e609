"""tools/inspect_checkpoint.py on a real TP=2 training checkpoint and its re-shardings: the step,
layout and counts it reads from headers agree with the tensors themselves."""

import contextlib
import dataclasses
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from megatron_dgrpo.config import from_dict
from megatron_dgrpo.models import mapping
from megatron_dgrpo.models.convert import MegatronCheckpoint
from megatron_dgrpo.models.presets import get_preset
from megatron_dgrpo.parallel.launch import run_distributed
from megatron_dgrpo.train.config import RunConfig

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "inspect_checkpoint.py"


def _train(rank, world_size, config_dict):
    from megatron_dgrpo.train.runner import run_training

    return run_training(from_dict(RunConfig, config_dict), show_progress=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cpu_assets):
    from megatron_dgrpo.data.chat import load_chat_tokenizer

    root = tmp_path_factory.mktemp("inspect")
    vocab = load_chat_tokenizer(cpu_assets / "tokenizer").vocab_size
    student = dataclasses.asdict(dataclasses.replace(get_preset("tiny-qwen3"), vocab_size=vocab))
    config = {"run_dir": str(root / "run"), "steps": 1, "save_every": 1, "prompts_per_step": 2,
              "tokenizer": str(cpu_assets / "tokenizer"), "parallel": {"tensor_parallel": 2},
              "student": {"preset": None, "model": student}, "loss": {"objective": "sft"},
              "data": {"paths": [str(cpu_assets / "data")]}}
    assert run_distributed(_train, 2, args=(config,)) == [0, 0]
    return root / "run"


def _load_tool():
    spec = importlib.util.spec_from_file_location("inspect_checkpoint", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


inspect_checkpoint = _load_tool()


def _inspect(path, *flags):
    """Run the tool's main() in this process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = inspect_checkpoint.main([str(path), *flags])
    return subprocess.CompletedProcess([], code, out.getvalue(), err.getvalue())


def _full_count(model_dir):
    ckpt = MegatronCheckpoint(model_dir)
    params = mapping.stage_params(ckpt.config, 0, 1)
    return sum(ckpt.full_tensor(p).numel() for p in params)


@pytest.mark.multiproc
def test_training_checkpoint_report_matches_the_tensors(run_dir):
    result = _inspect(run_dir, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    step_dir = run_dir / "checkpoints" / "step_00000001"
    assert report["kind"] == "training checkpoint" and report["path"] == str(step_dir)
    assert report["step"] == 1 and report["layout"]["world_size"] == 2
    assert [f["file"] for f in report["optimizer"]] == ["rank_00000.safetensors",
                                                        "rank_00001.safetensors"]
    model = report["model"]
    assert (model["tensor_parallel"], model["pipeline_parallel"]) == (2, 1)
    assert model["model"]["num_layers"] == get_preset("tiny-qwen3").num_layers
    for tp in range(2):
        tensors = load_file(step_dir / "model" / f"mp_rank_{tp:02d}_000" / "model.safetensors")
        assert model["parameters"]["per_rank"][f"tp{tp}_pp0"] == sum(t.numel() for t in tensors.values())
    assert model["parameters"]["total"] == _full_count(step_dir / "model")
    assert model["parameters"]["total_exact"] is True
    text = _inspect(step_dir)
    assert text.returncode == 0 and "step: 1" in text.stdout and "TP=2 x PP=1" in text.stdout


@pytest.mark.multiproc
def test_total_is_the_same_for_every_layout(run_dir, tmp_path):
    from megatron_dgrpo.cli import main

    model = run_dir / "checkpoints" / "step_00000001" / "model"
    total = json.loads(_inspect(model, "--json").stdout)["parameters"]["total"]
    assert main(["convert", "reshard", "--ckpt", str(model), "--out", str(tmp_path / "pp2"),
                 "--tp", "1", "--pp", "2"]) == 0
    report = json.loads(_inspect(tmp_path / "pp2", "--json").stdout)
    assert report["kind"] == "megatron checkpoint"
    assert (report["tensor_parallel"], report["pipeline_parallel"]) == (1, 2)
    assert report["parameters"]["total"] == total  # the tied output copy is not counted twice
    assert sorted(report["parameters"]["per_rank"]) == ["tp0_pp0", "tp0_pp1"]


def test_bad_paths_are_refused_clearly(tmp_path):
    missing = _inspect(tmp_path / "nope")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    empty_run = tmp_path / "run"
    (empty_run / "checkpoints").mkdir(parents=True)
    assert "no complete checkpoint yet" in _inspect(empty_run).stderr
    (tmp_path / "junk").mkdir()
    assert "neither a run directory" in _inspect(tmp_path / "junk").stderr
    broken = tmp_path / "broken"
    (broken / "mp_rank_00_000").mkdir(parents=True)
    (broken / "dgrpo_checkpoint.json").write_text(json.dumps(
        {"format": "megatron-dgrpo-safetensors", "format_version": 1, "model": {},
         "tensor_parallel": 1, "pipeline_parallel": 1}))
    (broken / "mp_rank_00_000" / "model.safetensors").write_bytes(b"\x00" * 4)
    result = _inspect(broken)
    assert result.returncode == 2 and "too short to be a safetensors file" in result.stderr


def test_help_runs_as_a_script():
    result = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "headers only" in result.stdout
