"""`dgrpo experiment`: the plan of runs (every method on the same budget, the ablations as
dGRPO variants), the report's statistics and verdict, and one reduced end-to-end run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import dataclasses

from megatron_dgrpo.experiment import FULL, METHODS, learning_curves, planned_runs, summarise
from megatron_dgrpo.experiment_report import mean_std, ordering_verdict, ranking_sentence


def test_every_method_sees_the_same_sequences_per_step_from_the_same_student():
    runs = planned_runs(FULL, [0, 1], [], "teacher-ckpt", "short")
    assert [r.method for r in runs] == list(METHODS) * 2
    for run in runs:
        sections = run.sections
        per_prompt = sections.get("sampling", {}).get("n", 1)
        assert sections["prompts_per_step"] * per_prompt == FULL.prompts_per_step * FULL.group_size
        assert not run.sft_cold_start  # every main run starts from the student base
        needs_teacher = run.method in ("kd", "opd", "dgrpo")
        assert (sections.get("teacher", {}).get("init_from") == "teacher-ckpt") == needs_teacher
    by_method = {r.method: r.sections for r in runs if r.seed == 0}
    assert by_method["sft"]["data"]["target"] == "response_teacher"
    assert "target" not in by_method["sft_reference"]["data"]  # the reference answers
    for method, sections in by_method.items():  # the seed: rollouts on-policy, order off-policy
        shuffle = sections.get("data", {}).get("shuffle_buffer", 0)
        assert (shuffle >= FULL.train_examples) == (method in ("sft", "sft_reference", "kd"))
    assert by_method["dgrpo"]["loss"]["kl_coef"] == FULL.dgrpo_kl_coef
    assert by_method["grpo"]["loss"]["kl_coef"] == FULL.grpo_kl_coef


def test_ablations_are_dgrpo_variants_without_duplicating_the_main_run():
    runs = planned_runs(FULL, [0], ["beta", "mix", "anchor", "cold"], "t", "short-data")
    variants = {r.method: r for r in runs if r.method not in METHODS}
    assert {m for m in variants if m.startswith("dgrpo_beta")} == {
        "dgrpo_beta0", "dgrpo_beta0.04", "dgrpo_beta0.5"}  # 1.0 is the main dgrpo run
    assert variants["dgrpo_beta0"].sections["loss"] == {"objective": "dgrpo", "kl_coef": 0.0}
    assert variants["dgrpo_long0.5"].sections["short_data"] == {"paths": ["short-data"]}
    assert variants["dgrpo_long0.9"].sections["mix"] == {"long_share": 0.9}
    assert "dgrpo_long1" not in variants  # all long tokens: the main dgrpo run
    assert variants["anchor_reference"].sections["loss"]["kl_coef"] == 0.0
    assert variants["anchor_reference"].sections["loss"]["ref_kl_coef"] == FULL.dgrpo_kl_coef
    assert variants["anchor_both"].sections["loss"]["kl_coef"] == FULL.dgrpo_kl_coef
    assert variants["dgrpo_sft_cold_start"].sft_cold_start
    assert variants["dgrpo_sft_cold_start"].sections == by_method_dgrpo(runs)
    with pytest.raises(ValueError, match="unknown ablation 'betas'"):
        planned_runs(FULL, [0], ["betas"], "t", "s")


def _long(score):
    return {"long": {"all": score, "families": {"grounding": score}}}


def test_held_out_curves_start_from_the_model_each_run_started_from():
    plan = dataclasses.replace(FULL, method_steps=6, curve_every=3)
    runs = [r for r in planned_runs(plan, [0, 1], ["cold"], "t", "s")
            if r.method in ("dgrpo", "dgrpo_sft_cold_start")]
    initial = {r.name: f"sft-cold-start-s{r.seed}" if r.sft_cold_start else "student_base"
               for r in runs}
    along = {"student_base": _long(2.0), "sft-cold-start-s0": _long(10.0),
             "sft-cold-start-s1": _long(12.0)}
    along |= {f"{r.name}@3": _long(20.0 + r.seed) for r in runs}
    final = {"student_base": _long(2.0)} | {r.name: _long(30.0 + r.seed) for r in runs}
    curves = learning_curves(final, along, runs, plan, initial)
    assert curves["dgrpo"] == {"0": [2.0, 2.0], "3": [20.0, 21.0], "6": [30.0, 31.0]}
    assert curves["dgrpo_sft_cold_start"]["0"] == [10.0, 12.0]
    table = summarise(final, runs)
    assert table["student_base"]["long"] == {"all": [2.0], "grounding": [2.0]}
    assert table["dgrpo"]["long"]["all"] == [30.0, 31.0]


def by_method_dgrpo(runs):
    return next(r.sections for r in runs if r.method == "dgrpo")


def _table(dgrpo, others):
    return {"dgrpo": {"long": {"all": dgrpo}}, **{m: {"long": {"all": v}} for m, v in others.items()}}


def test_the_verdict_weighs_differences_against_the_seeds_spread():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    clear = _table([50, 52, 54], {"sft": [30, 31, 32], "kd": [20, 22, 24], "grpo": [10, 10, 10],
                                  "opd": [40, 41, 42]})
    lines = ordering_verdict(clear, "long")
    assert lines[-1].startswith("**The paper's ordering (dGRPO above SFT, KD, GRPO and OPD) held")
    # sft: +21 points; two standard errors: 2 * sqrt(4/3 + 1/3) = 2.58
    assert "dGRPO is above sft on `long`: +21.0 points" in lines[0] and "2.6" in lines[0]
    noisy = _table([50, 30, 70], {"sft": [45, 46, 47], "kd": [0, 0, 0], "grpo": [0, 0, 0],
                                  "opd": [0, 0, 0]})
    lines = ordering_verdict(noisy, "long")
    assert "not distinguishable from sft" in lines[0]
    assert "did not hold" in lines[-1] and "above: kd, grpo, opd" in lines[-1]
    assert ordering_verdict({"dgrpo": {"long": {"all": [1.0]}}}, "long") == []  # nothing to beat


def test_an_ablation_is_ranked_beside_the_paper_and_the_seed_spread():
    table = {"dgrpo": {"long": {"all": [20.0, 24.0]}}, "dgrpo_beta0": {"long": {"all": [5.0, 5.0]}},
             "dgrpo_beta0.5": {"long": {"all": [30.0, 31.0]}}}
    sentence = ranking_sentence(table, {"dgrpo": 1.0, "dgrpo_beta0": 0.0, "dgrpo_beta0.5": 0.5},
                                "beta", "0.5 best, 0 worst")
    assert "(best first): 0.5: 30.5, 1: 22.0, 0: 5.0; the largest seed std among them is 2.8" \
        in sentence


@pytest.mark.extended
@pytest.mark.multiproc
@pytest.mark.slow
def test_a_reduced_experiment_runs_end_to_end(tmp_path):
    out = tmp_path / "experiment"
    result = subprocess.run([sys.executable, "-m", "megatron_dgrpo.cli", "experiment", "--out",
                             str(out), "--short", "--seeds", "0", "--ablations", "beta",
                             "--jobs", "2"], check=False, capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "experiment.json").read_text())
    assert set(summary["table"]) >= {*METHODS, "student_base", "dgrpo_beta0", "dgrpo_beta0.5"}
    for method, sets in summary["table"].items():
        assert set(sets) == {"long", "longer", "short"}, method
        assert all(0 <= v <= 100 for s in sets.values() for v in s["all"])
    report = (out / "report.md").read_text()
    assert "| no-context baseline |" in report and "The paper's ordering" in report
    for png in ("scores.png", "curves.png", "heldout_curves.png"):
        assert (out / png).stat().st_size > 0, png
    # the held-out curve of every run: the student base at step 0, then each checkpoint
    assert sorted(summary["curves"]["dgrpo"], key=int) == ["0", "1", "2"]
    assert summary["curves"]["dgrpo"]["0"] == summary["table"]["student_base"]["long"]["all"]
