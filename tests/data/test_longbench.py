"""LongBench / LongBench-v2 metrics, loaders and tables, and the short-context set, on small files
made here. Metric references: hand-computed from LongBench's published definitions."""

import argparse
import json

import pytest

from megatron_dgrpo.data import longbench_metrics as M
from megatron_dgrpo.data.chat import load_chat_tokenizer
from megatron_dgrpo.data.cli import add_eval_data_arguments, evaluate_from_args
from megatron_dgrpo.data.longbench import load_longbench, longbench_score, truncate_middle, v2_choice
from megatron_dgrpo.data.short_context import load_short_context


def test_qa_f1_normalizes_like_longbench():
    assert M.qa_f1("The Eiffel Tower!", "eiffel tower") == 1.0
    assert M.qa_f1("Paris, France", "Paris") == pytest.approx(2 / 3)  # P 1/2, R 1
    assert M.qa_f1("nothing", "Paris") == 0.0


def test_rouge_l_is_the_rouge_packages_summary_level_score():
    # one sentence each; distinct words 5 and 5; LCS "the cat on the mat" has words {the, cat, on, mat}
    assert M.rouge("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-7)
    # the union of per-sentence LCS word sets covers all four words although no sentence matches
    assert M.rouge("a b. c d", "a c. b d") == pytest.approx(1.0, abs=1e-7)
    assert M.rouge("", "a reference") == 0.0 and M.rouge("...", "a reference") == 0.0
    assert M.rouge("The Cat", "the cat") == 0.0  # no lower-casing, as the package


def test_classification_keeps_longbenchs_removal_quirk():
    classes = ["a", "ab", "abc", "x"]
    # matches [a, ab, abc, x]; LongBench removes "a" while iterating, which skips "ab": [ab, abc, x]
    assert M.classification("abc x", "abc", classes) == pytest.approx(1 / 3)
    assert M.classification("Location", "Location", ["Location", "Description"]) == 1.0
    assert M.classification("Location or Description", "Location", ["Location", "Description"]) == 0.5
    assert M.classification("Entity", "Location", ["Location", "Description"]) == 0.0


def test_number_metrics_and_code_similarity():
    assert M.retrieval("Paragraph 3, or maybe paragraph 12", "Paragraph 3") == 0.5
    assert M.retrieval_zh("段落5", "段落5") == 1.0
    assert M.count("There are 7 unique paragraphs; 7.", "7") == 1.0
    assert M.count("7 or 8", "7") == 0.5 and M.count("none", "7") == 0.0
    # first line without `, # or //: "    x = foo(1)" vs "    x = foo(2)": 13 of 14 chars match -> 26/28 -> 93%
    assert M.code_sim("\n# comment\n    x = foo(1)\nmore", "    x = foo(2)") == 0.93
    assert M.code_sim("```python", "x = 1") == 0.0 and M.code_sim("", "") == 1.0


def test_chinese_metrics_need_jieba():
    try:
        import jieba  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install jieba"):
            M.qa_f1_zh("北京", "北京")
    else:
        assert M.qa_f1_zh("北京是首都。", "北京是首都") == 1.0


def _v1_rows():
    return [
        {"input": "Who wrote it?", "context": "Passage 1: Ann wrote the book.", "answers": ["Ann", "Ann Lee"],
         "length": 3000, "dataset": "hotpotqa", "language": "en", "all_classes": None, "_id": "h1"},
        {"input": "Who read it?", "context": "Passage 1: Bob read the book.", "answers": ["Bob"],
         "length": 9000, "dataset": "hotpotqa_e", "language": "en", "all_classes": None, "_id": "h2"},
        {"input": "What is the capital of France?", "context": "Question: Who? Type: Human being",
         "answers": ["Location"], "length": 500, "dataset": "trec", "language": "en",
         "all_classes": ["Location", "Human being", "Description"], "_id": "t1"},
    ]


def _v2_rows():
    base = {"domain": "d", "sub_domain": "s", "question": "Which?", "context": "Some long text.",
            "choice_A": "one", "choice_B": "two", "choice_C": "three", "choice_D": "four"}
    return [{**base, "_id": f"v{i}", "difficulty": d, "length": n, "answer": a}
            for i, (d, n, a) in enumerate([("easy", "short", "A"), ("hard", "short", "B"),
                                           ("hard", "long", "C"), ("easy", "medium", "D")])]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def test_v1_prompts_chat_rules_and_scores(tmp_path, hf_tokenizer_dir):
    tokenizer = load_chat_tokenizer(hf_tokenizer_dir)
    items = load_longbench([_write_jsonl(tmp_path / "lb.jsonl", _v1_rows())], tokenizer)
    hotpot, hotpot_e, trec = items
    hotpot_text, trec_text = (tokenizer.decode(list(i.prompt_ids)) for i in (hotpot, trec))
    assert hotpot_text.startswith("<|im_start|>user\nAnswer the question based on the given passages.")
    assert "Passage 1: Ann wrote the book.\n\nAnswer the question" in hotpot_text
    assert hotpot.family == hotpot_e.family == "hotpotqa"
    assert (hotpot.length_bucket, hotpot_e.length_bucket, trec.length_bucket) == ("0-4k", "8k+", "0-4k")
    assert trec_text.startswith("Please determine the type of the question below.")  # no chat template
    assert longbench_score(hotpot, "Ann Lee.") == 1.0  # best of the answers
    assert longbench_score(hotpot, "<think>maybe Bob</think>Ann") == 1.0
    assert longbench_score(trec, "Location\nDescription") == 1.0  # first line only
    assert longbench_score(trec, "Description or Location") == 0.5


def test_v2_letters_and_table(tmp_path, hf_tokenizer_dir):
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(_v2_rows()))
    assert v2_choice("**The correct answer is (B)**") == "B"
    assert v2_choice("The correct answer is C.") == "C" and v2_choice("B") is None
    parser = argparse.ArgumentParser()
    add_eval_data_arguments(parser)
    args = parser.parse_args(["--suite", "longbench", "--data", str(path), "--tokenizer", str(hf_tokenizer_dir),
                              "--report-dir", str(tmp_path / "report")])
    answers = iter(["The correct answer is (A)", "The correct answer is (A)", "The correct answer is (C)", "D"])
    table = evaluate_from_args(args, lambda prompts: [next(answers) for _ in prompts])
    assert table.score("v2:easy") == 50.0 and table.score("v2:hard") == 50.0
    markdown = (tmp_path / "report" / "longbench.md").read_text()
    assert "| Overall | Easy | Hard | Short | Medium | Long |" in markdown
    assert "| 50.0 | 50.0 | 50.0 | 50.0 | 0.0 | 100.0 |" in markdown


def test_v1_table_macro_averages_by_dataset_and_category(tmp_path, hf_tokenizer_dir):
    rows = _v1_rows() + [{**_v1_rows()[0], "_id": "h3", "answers": ["Cy"]}]
    parser = argparse.ArgumentParser()
    add_eval_data_arguments(parser)
    args = parser.parse_args(["--suite", "longbench", "--data", str(_write_jsonl(tmp_path / "lb.jsonl", rows)),
                              "--tokenizer", str(hf_tokenizer_dir), "--report-dir", str(tmp_path / "report")])
    responses = iter(["Ann", "Bob", "Location", "Ann"])  # hotpotqa 1, 1, 0 -> 66.7; trec 100
    evaluate_from_args(args, lambda prompts: [next(responses) for _ in prompts])
    markdown = (tmp_path / "report" / "longbench.md").read_text()
    assert "| dataset | 0-4k | 8k+ | avg |" in markdown
    assert "| hotpotqa | 50.0 | 100.0 | 75.0 |" in markdown
    assert "| trec | 100.0 | - | 100.0 |" in markdown
    assert "| *Multi-Doc QA* | 50.0 | 100.0 | 75.0 |" in markdown
    assert "| **average** | 75.0 | 100.0 | 87.5 |" in markdown


def test_middle_truncation_keeps_both_ends(hf_tokenizer_dir):
    tokenizer = load_chat_tokenizer(hf_tokenizer_dir)
    text = "START " + "filler words here " * 200 + " END"
    cut = truncate_middle(text, tokenizer, 40)
    assert cut.startswith("START") and cut.endswith("END") and len(tokenizer.encode(cut)) <= 42
    assert truncate_middle("short", tokenizer, 40) == "short"


@pytest.mark.parametrize("mutate,message", [
    (lambda rows: rows[1].pop("answers"), r"lb\.jsonl:2: missing field 'answers'"),
    (lambda rows: rows[2].update(all_classes=None), r"lb\.jsonl:3: field 'all_classes' is needed"),
    (lambda rows: rows[0].update(dataset="nope"), r"lb\.jsonl:1: field 'dataset' = 'nope' is not a LongBench dataset"),
    (lambda rows: rows[0].update(length="long"), r"lb\.jsonl:1: field 'length' must be int"),
])
def test_bad_longbench_rows_are_named_and_nothing_is_written(tmp_path, hf_tokenizer_dir, mutate, message):
    rows = _v1_rows()
    mutate(rows)
    parser = argparse.ArgumentParser()
    add_eval_data_arguments(parser)
    args = parser.parse_args(["--suite", "longbench", "--data", str(_write_jsonl(tmp_path / "lb.jsonl", rows)),
                              "--tokenizer", str(hf_tokenizer_dir), "--report-dir", str(tmp_path / "report")])
    calls = []
    with pytest.raises(ValueError, match=message):
        evaluate_from_args(args, lambda prompts: calls.append(prompts) or ["x"] * len(prompts))
    assert not calls and not (tmp_path / "report").exists()


def test_missing_and_malformed_files(tmp_path, hf_tokenizer_dir):
    tokenizer = load_chat_tokenizer(hf_tokenizer_dir)
    with pytest.raises(ValueError, match="does not exist"):
        load_longbench([tmp_path / "none.jsonl"], tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_v1_rows()[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not a JSON object"):
        load_longbench([bad], tokenizer)
    rows = _v2_rows()
    rows[1]["answer"] = "E"
    with pytest.raises(ValueError, match=r"v2\.json\[1\]: field 'answer' must be one of"):
        (tmp_path / "v2.json").write_text(json.dumps(rows))
        load_longbench([tmp_path / "v2.json"], tokenizer)


def test_short_context_set_scores_by_its_metric(tmp_path, hf_tokenizer_dir):
    rows = [{"question": "What is 6 x 7?", "answer": "42", "metric": "numeric_match", "task": "gsm8k"},
            {"question": "Capital of France?", "answer": "Paris", "metric": "exact_match", "id": "q2",
             "context": "France is a country."},
            {"question": "Capital of Spain?", "answer": "Madrid", "metric": "exact_match"}]
    path = _write_jsonl(tmp_path / "retention.jsonl", rows)
    tokenizer = load_chat_tokenizer(hf_tokenizer_dir)
    items = load_short_context([path], tokenizer)
    assert [i.id for i in items] == ["retention-1", "q2", "retention-3"]
    assert [i.family for i in items] == ["gsm8k", "retention", "retention"]
    assert "France is a country.\n\nCapital of France?\n\nEnd your reply" in tokenizer.decode(
        list(items[1].prompt_ids))
    parser = argparse.ArgumentParser()
    add_eval_data_arguments(parser)
    args = parser.parse_args(["--suite", "short", "--data", str(path), "--tokenizer", str(hf_tokenizer_dir),
                              "--report-dir", str(tmp_path / "report")])
    table = evaluate_from_args(args, lambda prompts: ["6 x 7 ...\nAnswer: 42.0", "Answer: paris", "Answer: Lisbon"])
    assert table.score("gsm8k") == 100.0 and table.score("retention") == 50.0


@pytest.mark.parametrize("row,message", [
    ({"question": "q", "answer": "a"}, r"retention\.jsonl:1: missing field 'metric'"),
    ({"question": "q", "answer": "a", "metric": "bleu"}, r"retention\.jsonl:1: field 'metric' = 'bleu' is not a reward"),
    ({"question": "q", "answer": 4, "metric": "exact_match"}, r"retention\.jsonl:1: field 'answer' must be str"),
    ({"question": " ", "answer": "a", "metric": "exact_match"}, r"retention\.jsonl:1: field 'question' is empty"),
])
def test_bad_short_context_rows(tmp_path, hf_tokenizer_dir, row, message):
    path = _write_jsonl(tmp_path / "retention.jsonl", [row])
    with pytest.raises(ValueError, match=message):
        load_short_context([path], load_chat_tokenizer(hf_tokenizer_dir))


def test_suites_that_read_files_need_data(tmp_path, hf_tokenizer_dir):
    parser = argparse.ArgumentParser()
    add_eval_data_arguments(parser)
    for suite in ("longblocks", "longbench", "short"):
        args = parser.parse_args(["--suite", suite, "--tokenizer", str(hf_tokenizer_dir),
                                  "--report-dir", str(tmp_path / suite)])
        with pytest.raises(ValueError, match=f"--suite {suite} needs --data"):
            evaluate_from_args(args, lambda prompts: [])
