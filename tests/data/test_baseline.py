"""The no-context baseline on hand-made cases: which answer each key gets, back-off, scoring, reading."""

import json
from collections import Counter

import pyarrow.parquet as pq
import pytest

from megatron_dgrpo.data.baseline import FitRow, Mode, NoContextBaseline, read_fit_rows
from megatron_dgrpo.data.evaluate import IN_SAMPLE, EvalItem, evaluate
from megatron_dgrpo.data.rewards import RewardConfig
from megatron_dgrpo.data.synth import SynthConfig
from megatron_dgrpo.data.synth.writer import write_synth_dataset

COUNT = "How many different {kind}s are named in the document?"
OTHER = "How many {kind}s?"


def item(reference, task="count_items", template=COUNT, family="synthesis", bucket="256"):
    return EvalItem(id=reference, prompt_ids=(), reference=reference, task=task, family=family,
                    length_bucket=bucket, depth="0", template=template)


TRAIN = [
    FitRow("synthesis", "count_items", COUNT, "3"),
    FitRow("synthesis", "count_items", COUNT, "5"),
    FitRow("synthesis", "count_items", COUNT, "5"),
    FitRow("synthesis", "count_items", OTHER, "7"),
    FitRow("synthesis", "count_items", OTHER, "3"),  # ties with "7": the first seen wins
    FitRow("synthesis", "sum_values", "In total ...?", "120"),
    FitRow("longblocks:wiki", None, None, "green"),
]


def test_answers_back_off_from_template_to_task_to_family():
    baseline = NoContextBaseline.fit(TRAIN, fit_on="hand-made rows")
    assert baseline.num_examples == 7 and baseline.fit_on == "hand-made rows (7 examples)"
    assert baseline.answer(item("x")) == "5"  # 2 of 3 for COUNT
    assert baseline.answer(item("x", template=OTHER)) == "7"  # 7 and 3 tie: 7 came first
    assert baseline.answer(item("x", template="unseen {kind}")) == "3"  # task: 3 x2, 5 x2, 7 x1; 3 first
    assert baseline.answer(item("x", task="list_items", template=None)) == "3"  # family: same counts
    assert baseline.answer(item("x", task=None, template=None, family="longblocks:wiki")) == "green"
    assert baseline.answer(item("x", family="longblocks:books", task=None, template=None)) == ""


def test_scores_use_the_evaluation_rewards_per_task():
    baseline = NoContextBaseline.fit(TRAIN, fit_on="hand-made rows")
    heldout = [
        item("5"),  # answered 5: numeric_match 1
        item("4"),  # answered 5: 0
        item("7", template=OTHER, bucket="512"),  # answered 7: 1
        item("120 crates", task="sum_values", template="In total ...?"),  # numeric: 1
        item("green sky", task=None, template=None, family="longblocks:wiki"),  # token_f1 2/3
    ]
    scores = baseline.score(heldout, RewardConfig())
    assert scores.fit_on == "hand-made rows (7 examples)"
    assert [s.response for s in scores.table.scored] == ["5", "5", "7", "120", "green"]
    assert [s.score for s in scores.table.scored] == pytest.approx([1, 0, 1, 1, 2 / 3])
    assert scores.table.score("synthesis") == pytest.approx(75.0)
    assert scores.table.score("synthesis", "256") == pytest.approx(100 * 2 / 3)
    assert scores.table.score() == pytest.approx(100 * (3 + 2 / 3) / 5)


def test_leaving_one_out_breaks_ties_by_first_seen_and_backs_off_when_nothing_is_left():
    later_wins = Mode.of(Counter(["x", "y", "y"]))  # y is the mode; x was seen first
    assert (later_wins.answer, later_wins.runner_up, later_wins.answer_first) == ("y", "x", False)
    assert later_wins.without("y") == "x" and later_wins.without("x") == "y"
    tie = Mode.of(Counter(["a", "b", "a", "b"]))
    assert tie.answer == "a" and tie.without("a") == "b" and tie.without("b") == "a"
    assert Mode.of(Counter(["z"])).without("z") is None
    assert Mode.of(Counter(["z", "z"])).without("z") == "z"

    # unique answers (fresh names): in-sample the first name scores its own item, leave-one-out none
    names = [item(f"Name {i}", task="multihop", template="Who is the {relation} of {person}?",
                  family="multihop") for i in range(4)]
    baseline = NoContextBaseline.fit(names, fit_on="the names")
    assert baseline.score(names, RewardConfig()).table.score() == 25.0
    assert baseline.score(names, RewardConfig(), leave_out=True).table.score() == 0.0
    # a template only this item has: back off to the task's answers without it
    alone = NoContextBaseline.fit([item("3"), item("4", template=OTHER)], fit_on="two")
    assert alone.answer(item("4", template=OTHER), leave_out=True) == "3"
    assert alone.answer(item("4", template=OTHER)) == "4"


def test_an_empty_fit_set_is_refused():
    with pytest.raises(ValueError, match="no usable examples in nothing"):
        NoContextBaseline.fit([], fit_on="nothing")


def test_rows_are_read_from_parquet_with_their_metadata(tmp_path, public_row, write_parquet):
    untasked = {"task_family": None, "task": None, "question_template": None}
    rows = [
        public_row(0, **untasked),
        public_row(1, answer="", **untasked),  # skipped like the loader skips it
        public_row(2, task_family="synthesis", task="count_items", question_template=COUNT, answer="4"),
    ]
    write_parquet(tmp_path / "train" / "a.parquet", rows)
    assert list(read_fit_rows([str(tmp_path / "train")])) == [
        FitRow("longblocks:wiki", None, None, "green"),
        FitRow("synthesis", "count_items", COUNT, "4"),
    ]
    with pytest.raises(ValueError, match="does not exist"):
        list(read_fit_rows([str(tmp_path / "missing")]))


class _Example:
    """The fields of a LongBlocksExample that evaluation reads."""

    def __init__(self, index, answer, task="count_items"):
        self.id, self.prompt_ids, self.reference_answer = f"e{index}", [index], answer
        self.source, self.num_prompt_tokens = "synthetic", 10
        self.metadata = {"task_family": "synthesis", "task": task, "question_template": COUNT,
                         "length_bucket": "256", "needle_depth_target": 0.0}


def test_evaluate_fits_in_sample_by_default_and_says_so(tmp_path):
    examples = [_Example(0, "3"), _Example(1, "3"), _Example(2, "6")]
    table = evaluate(examples, lambda prompts: ["Answer: 6"] * len(prompts), out_dir=tmp_path / "r")
    assert table.score() == pytest.approx(100 / 3)
    assert table.baseline.table.score() == pytest.approx(200 / 3)  # "3" on all three
    # leave-one-out: a "3" item sees 3 x1, 6 x1 (3 first); the "6" item sees 3 x2
    assert table.baseline.fit_on == f"{IN_SAMPLE} (3 examples), leave-one-out"
    markdown = (tmp_path / "r" / "scores.md").read_text()
    assert "| family | 256 | all | baseline |" in markdown
    assert "| synthesis | 33.3 | 33.3 | 66.7 |" in markdown
    assert "in-sample" in markdown
    saved = json.loads((tmp_path / "r" / "scores.json").read_text())["baseline"]
    assert saved["fit_on"] == table.baseline.fit_on
    assert {(c["family"], c["length_bucket"], c["depth"]): c["score"] for c in saved["cells"]}[
        ("all", "all", "all")] == pytest.approx(200 / 3)
    fitted = evaluate(examples, lambda prompts: ["Answer: 6"] * len(prompts),
                      baseline=NoContextBaseline.fit(TRAIN, "hand-made rows"))
    assert fitted.baseline.fit_on == "hand-made rows (7 examples)"
    assert fitted.baseline.table.score() == pytest.approx(0.0)  # answers "5" to every COUNT question
    plain = evaluate(examples, lambda prompts: ["Answer: 6"] * len(prompts), in_sample_baseline=False)
    assert plain.baseline is None and "baseline" not in plain.to_markdown()
    assert json.loads(plain.to_json())["baseline"] is None


def test_data_baseline_command_prints_scores_per_task(tmp_path, hf_tokenizer_dir, capsys):
    from megatron_dgrpo.cli import main

    for name, seed in (("train", 0), ("heldout", 1)):
        write_synth_dataset(SynthConfig(num_examples=30, lengths=(256,), tasks=("count_items", "event_order"),
                                        seed=seed, filler_bank_size=200), tmp_path / name)
    train = pq.read_table(tmp_path / "train").to_pylist()
    heldout = pq.read_table(tmp_path / "heldout").to_pylist()
    expected = {}
    for task in ("count_items", "event_order"):  # one template per task: its first most frequent answer
        answers = [r["answer"] for r in train if r["task"] == task]
        mode = max(answers, key=lambda a: (answers.count(a), -answers.index(a)))
        held = [r["answer"] for r in heldout if r["task"] == task]
        expected[task] = 100 * held.count(mode) / len(held)
    argv = ["data", "baseline", "--fit", str(tmp_path / "train"), "--data", str(tmp_path / "heldout"),
            "--tokenizer", str(hf_tokenizer_dir)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for task, score in expected.items():
        assert f"| {task} | 15 | {score:.1f} |" in printed
    assert "fit on --fit" in printed and "(30 examples)" in printed
    assert main([*argv[:3], str(tmp_path / "missing"), *argv[4:]]) == 2
    assert "does not exist" in capsys.readouterr().err
