"""The quickstart's shipped models (megatron_dgrpo/assets/quickstart): they are the files their
manifest names, a damaged or missing file is refused before any work, and they are what the
README says they are on the quickstart's own held-out set, measured here: the teacher reads
(its retrieval scores are far above answering without the document) and the student base does
not (it scores the no-context baseline)."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml

from megatron_dgrpo.config import from_dict, to_dict
from megatron_dgrpo.train.config import RunConfig

from megatron_dgrpo.parallel.launch import run_distributed
from megatron_dgrpo.quickstart import (FULL, QUICKSTART_ASSETS, STUDENT_BASE, TEACHER,
                                       make_assets, shipped_model)
from megatron_dgrpo.recipe import HeldOut, evaluate_models


def test_shipped_models_match_their_manifest():
    for label in (TEACHER, STUDENT_BASE):
        assert shipped_model(label) == QUICKSTART_ASSETS / label


@pytest.mark.parametrize("damage", ["lfs_pointer", "one_byte", "missing", "no_manifest"])
def test_a_damaged_shipped_model_is_refused_naming_the_file(tmp_path, damage):
    assets = tmp_path / "quickstart"
    shutil.copytree(QUICKSTART_ASSETS, assets)
    weights = assets / TEACHER / "mp_rank_00_000" / "model.safetensors"
    if damage == "lfs_pointer":
        weights.write_text("version https://git-lfs.github.com/spec/v1\n"
                           "oid sha256:00\nsize 4203824\n")
    elif damage == "one_byte":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
    elif damage == "missing":
        weights.unlink()
    else:
        (assets / "manifest.json").unlink()
    error = FileNotFoundError if damage in ("missing", "no_manifest") else ValueError
    named = "manifest.json" if damage == "no_manifest" else "model.safetensors"
    with pytest.raises(error, match=named):
        shipped_model(TEACHER, assets)
    if damage != "no_manifest":  # the other shipped model is still accepted
        assert shipped_model(STUDENT_BASE, assets) == assets / STUDENT_BASE


@pytest.mark.multiproc
@pytest.mark.slow
def test_teacher_reads_and_student_base_scores_the_no_context_baseline(tmp_path):
    assets = make_assets(tmp_path, FULL, seed=0)  # the quickstart's data for seed 0
    held_out = HeldOut("heldout", str(assets["heldout"]), str(assets["train"]),
                       FULL.max_new_tokens)
    models = [("teacher", str(shipped_model(TEACHER))),
              ("student-base", str(shipped_model(STUDENT_BASE)))]
    scores = run_distributed(evaluate_models, 1, args=(models, str(assets["tokenizer"]),
                                                       [held_out], str(tmp_path / "eval")))[0]
    teacher = scores["teacher"]["heldout"]["families"]
    base = scores["student-base"]["heldout"]["families"]
    baseline = scores["teacher"]["heldout"]["baseline"]
    assert sorted(teacher) == ["grounding", "multihop"]
    for family in teacher:
        # every answer is a made-up name or a counterfactual value stated only in the document
        assert baseline[family] <= 10.0, family
        assert teacher[family] >= baseline[family] + 30.0, (family, teacher, baseline)
        assert base[family] <= baseline[family] + 5.0, (family, base, baseline)


def _tool():
    spec = importlib.util.spec_from_file_location(
        "make_quickstart_models", Path(__file__).parents[2] / "tools" / "make_quickstart_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _without_paths(config: dict) -> dict:
    config = json.loads(json.dumps(config))  # tuples as lists, as in YAML
    for key in ("run_dir", "tokenizer"):
        config.pop(key)
    config["data"].pop("paths")
    config["student"].pop("init_from")
    return config


def test_the_tool_states_the_runs_that_made_the_shipped_models(tmp_path):
    """tools/make_quickstart_models.py's phase configs are the logged ones (paths aside), each
    phase starts from the checkpoint the manifest's lineage names, and the manifest points at
    the steps the tool ships."""
    tool = _tool()
    manifest = json.loads((QUICKSTART_ASSETS / "manifest.json").read_text())
    assert {label: (entry["phase"], entry["step"]) for label, entry in
            manifest["models"].items()} == tool.SHIPPED
    for phase, (init, *_rest) in tool.PHASES.items():
        made = tool.phase_config(tmp_path, phase)
        logged = yaml.safe_load((QUICKSTART_ASSETS / "logs" / phase / "config.yaml").read_text())
        if init is None:
            assert made["student"].get("init_from") is logged["student"]["init_from"] is None
        else:
            suffix = f"checkpoints/step_{init[1]:08d}/model"
            assert made["student"]["init_from"] == str(tmp_path / "runs" / init[0] / suffix)
            assert logged["student"]["init_from"].endswith(suffix)
            # resolving the config opens the checkpoint: any real one of the same architecture
            made["student"]["init_from"] = str(QUICKSTART_ASSETS / STUDENT_BASE)
            logged["student"]["init_from"] = made["student"]["init_from"]
        resolved = to_dict(from_dict(RunConfig, made))
        # the log resolved again: options added since the runs take their defaults (each
        # default keeps the earlier behaviour, e.g. data.shuffle_buffer 0 = file order)
        logged_resolved = to_dict(from_dict(RunConfig, logged))
        assert _without_paths(resolved) == _without_paths(logged_resolved), phase
