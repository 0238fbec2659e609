"""The README's first command, `dgrpo quickstart`, in its short form: every phase runs and the
report's numbers are the ones its own outputs give when re-scored independently."""

import json
import statistics

import pytest
import yaml

from megatron_dgrpo.cli import main
from megatron_dgrpo.data.rewards import RewardConfig
from megatron_dgrpo.quickstart import SHORT

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "qs"
    assert main(["quickstart", "--short", "--out", str(out)]) == 0
    return out, json.loads((out / "quickstart.json").read_text())


def test_every_phase_trains_its_steps_and_writes_curves(short_run):
    out, summary = short_run
    steps = {"teacher-sft": SHORT.teacher_sft_steps, "student-cold-start": SHORT.cold_start_steps,
             "student-dgrpo": SHORT.dgrpo_steps}
    for run, count in steps.items():
        records = [json.loads(line) for line in (out / "runs" / run / "metrics.jsonl").open()]
        assert [r["step"] for r in records] == list(range(1, count + 1)), run
        assert (out / "runs" / run / "report" / "curves.png").stat().st_size > 0
    dgrpo = [json.loads(line) for line in (out / "runs" / "student-dgrpo" / "metrics.jsonl").open()]
    assert all(r["policy/kl_teacher"] > 0 for r in dgrpo)  # the teacher is the anchor
    assert (out / "heldout_reward.png").stat().st_size > 0
    assert summary["plan_name"] == "short"


def test_dgrpo_starts_from_the_cold_start_with_the_sft_teacher(short_run):
    out, _ = short_run
    config = yaml.safe_load((out / "runs" / "student-dgrpo" / "config.yaml").read_text())
    assert config["loss"]["objective"] == "dgrpo"
    assert config["student"]["init_from"].endswith(
        f"student-cold-start/checkpoints/step_{SHORT.cold_start_steps:08d}/model")
    assert config["teacher"]["init_from"].endswith(
        f"teacher-sft/checkpoints/step_{SHORT.teacher_sft_steps:08d}/model")


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


def test_an_existing_output_directory_is_refused_and_kept(short_run, capsys):
    out, _ = short_run
    before = sorted(p.name for p in out.iterdir())
    assert main(["quickstart", "--short", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
