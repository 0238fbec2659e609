"""Metrics JSONL/TensorBoard logging, resume truncation, and the `dgrpo report` renderer."""


import pytest

from megatron_dgrpo.cli import main
from megatron_dgrpo.train.metrics import METRICS_FILE, MetricsLogger, read_metrics


def _log_steps(run_dir, steps, resume_step=None):
    with MetricsLogger(run_dir, resume_step=resume_step) as logger:
        for step in steps:
            logger.log(step, {"reward/mean": step / 10, "kl/teacher": 1.0 / step,
                              "loss": float("nan") if step == 3 else step})


def test_records_tensorboard_and_non_finite_values(tmp_path):
    _log_steps(tmp_path, [1, 2, 3])
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["reward/mean"] == 0.2 and records[1]["kl/teacher"] == 0.5
    assert records[2]["loss"] is None  # NaN is written as null, not as invalid JSON
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_fresh_run_refuses_existing_metrics_and_resume_drops_uncovered_steps(tmp_path):
    _log_steps(tmp_path, [1, 2, 3, 4])
    with pytest.raises(FileExistsError, match="already has records"):
        MetricsLogger(tmp_path)
    # Interrupted after step 4, last checkpoint at step 2: steps 3-4 are redone.
    _log_steps(tmp_path, [3, 4, 5], resume_step=2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]


def test_torn_last_line_is_skipped(tmp_path):
    _log_steps(tmp_path, [1, 2])
    with open(tmp_path / METRICS_FILE, "a") as handle:
        handle.write('{"step": 3, "rew')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_report_command_writes_png_and_summary(tmp_path, capsys):
    _log_steps(tmp_path, [1, 2, 3, 4])
    assert main(["report", str(tmp_path)]) == 0
    png = (tmp_path / "report" / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    summary = (tmp_path / "report" / "summary.md").read_text()
    # kl/teacher = 1/step: first 1, last 0.25, min 0.25, max 1.
    assert "| kl/teacher | 1 | 0.25 | 0.25 | 1 |" in summary
    # loss skips the null at step 3: first 1, last 4.
    assert "| loss | 1 | 4 | 1 | 4 |" in summary


def test_report_of_a_run_without_metrics_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl records" in capsys.readouterr().err


def test_report_plots_held_out_scores_per_family_with_the_baseline(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(0, {"eval_baseline/synthesis": 12.5, "eval_baseline/all": 10.0,
                       "eval/synthesis/1k": 20.0, "eval/synthesis/all": 20.0, "eval/all": 20.0})
        logger.log(1, {"loss": 1.0})
        logger.log(2, {"loss": 0.5, "eval/synthesis/1k": 40.0, "eval/synthesis/all": 40.0,
                       "eval/all": 40.0})
    assert main(["report", str(tmp_path)]) == 0
    png = (tmp_path / "report" / "eval.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "| family | step 0 | step 2 | baseline |" in summary
    assert "| synthesis | 20.0 | 40.0 | 12.5 |" in summary
    assert "| all | 20.0 | 40.0 | 10.0 |" in summary
