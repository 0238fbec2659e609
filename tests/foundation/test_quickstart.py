"""The README's first command, `dgrpo quickstart`, in its short form: every phase runs from the
shipped models and the report's numbers are the ones its own outputs give when re-scored
independently. That the shipped teacher reads and that dGRPO teaches the student to read is
tests/foundation/test_quickstart_learning.py."""

import json
import statistics

import pytest
import yaml

from megatron_dgrpo.cli import main
from megatron_dgrpo.data.rewards import RewardConfig
from megatron_dgrpo.quickstart import (HELDOUT_SEED, QUICKSTART_ASSETS, SHORT, STUDENT_BASE,
                                       TEACHER)

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "qs"
    assert main(["quickstart", "--short", "--out", str(out)]) == 0
    return out, json.loads((out / "quickstart.json").read_text())


def test_dgrpo_trains_its_steps_and_writes_curves(short_run):
    out, summary = short_run
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["student-dgrpo"]
    run = out / "runs" / "student-dgrpo"
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == list(range(1, SHORT.dgrpo_steps + 1))
    assert all(r["policy/kl_teacher"] > 0 for r in records)  # the teacher is the anchor
    assert (run / "report" / "curves.png").stat().st_size > 0
    assert (out / "heldout_reward.png").stat().st_size > 0
    assert summary["plan_name"] == "short"


def test_dgrpo_starts_from_the_shipped_student_base_with_the_shipped_teacher(short_run):
    out, _ = short_run
    config = yaml.safe_load((out / "runs" / "student-dgrpo" / "config.yaml").read_text())
    assert config["loss"]["objective"] == "dgrpo"
    assert config["student"]["init_from"] == str(QUICKSTART_ASSETS / STUDENT_BASE)
    assert config["teacher"]["init_from"] == str(QUICKSTART_ASSETS / TEACHER)
    assert (out / "assets" / "tokenizer" / "tokenizer.json").read_bytes() == (
        QUICKSTART_ASSETS / "tokenizer" / "tokenizer.json").read_bytes()


def test_reported_heldout_scores_match_a_rescoring_of_the_predictions(short_run):
    out, summary = short_run
    labels = ["teacher", "student-step-0"] + [f"student-step-{s}" for s in
                                              range(SHORT.eval_every, SHORT.dgrpo_steps + 1,
                                                    SHORT.eval_every)]
    assert list(summary["heldout"]) == labels
    rewards = RewardConfig()
    for label in labels:
        predictions = [json.loads(line) for line in (out / "eval" / label / "heldout" / "predictions.jsonl").open()]
        assert len(predictions) == SHORT.heldout_examples
        rescored = [rewards.score(p["response"], p["reference"], p["task"]) for p in predictions]
        assert summary["heldout"][label]["all"] == pytest.approx(100 * statistics.mean(rescored))
    assert summary["student_before"] == summary["heldout"]["student-step-0"]["all"]
    assert summary["student_after"] == summary["heldout"][labels[-1]]["all"]
    assert summary["learning"] == (summary["student_after"] > summary["student_before"])
    report = (out / "report.md").read_text()
    assert report.startswith("# dgrpo quickstart")
    assert f"| teacher | {summary['teacher']:.1f} |" in report
    assert f"| no-context baseline | {summary['baseline']['all']:.1f} |" in report


def test_an_existing_output_directory_is_refused_and_kept(short_run, capsys):
    out, _ = short_run
    before = sorted(p.name for p in out.iterdir())
    assert main(["quickstart", "--short", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_the_held_out_seed_is_refused_as_a_training_seed(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--seed", str(HELDOUT_SEED), "--out", str(out)]) == 2
    assert "held-out set's seed" in capsys.readouterr().err
    assert not out.exists()
