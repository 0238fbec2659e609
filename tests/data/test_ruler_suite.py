"""RULER QA from user files, RULER scoring, the task x length table, `dgrpo data ruler` and the
`--suite ruler` evaluation path (a program "model" stands in for the engine)."""

import argparse
import json
import re

import pytest

from megatron_dgrpo.cli import main
from megatron_dgrpo.data.chat import load_chat_tokenizer
from megatron_dgrpo.data.cli import add_eval_data_arguments, evaluate_from_args
from megatron_dgrpo.data.evaluate import EvalItem, EvalTable, ScoredItem
from megatron_dgrpo.data.rewards import REWARDS, RewardConfig, join_references
from megatron_dgrpo.data.ruler import RulerConfig, RulerGenerator
from megatron_dgrpo.data.ruler.report import ruler_files


def _squad(path):
    articles = []
    for a in range(3):
        paragraphs = []
        for p in range(3):
            context = f"Article {a} paragraph {p}. " + " ".join(f"w{a}{p}{i}" for i in range(40))
            paragraphs.append({"context": context, "qas": [
                {"question": f"Which token follows w{a}{p}0?", "answers": [{"text": f"w{a}{p}1"}, {"text": f"w{a}{p}1"}],
                 "is_impossible": False},
                {"question": "Unanswerable?", "answers": [], "is_impossible": True}]})
        articles.append({"title": f"t{a}", "paragraphs": paragraphs})
    path.write_text(json.dumps({"data": articles}))
    return path


def _hotpot(path):
    records = [{"question": f"Q{i}?", "answer": f"answer {i}",
                "context": [[f"Title {i}-{j}", [f"Sentence {i}-{j}. ", "More text here."]] for j in range(3)]}
               for i in range(5)]
    path.write_text(json.dumps(records))
    return path


def test_qa_documents_gold_then_same_article_distractors(tmp_path):
    squad, hotpot = _squad(tmp_path / "squad.json"), _hotpot(tmp_path / "hotpot.json")
    generator = RulerGenerator(RulerConfig(lengths=(1024,), num_per_task=4, tasks=("qa_1", "qa_2"),
                                           qa_files={"qa_1": str(squad), "qa_2": str(hotpot)}))
    for index in range(4):
        example = generator.example("qa_1", 1024, index)
        docs = re.findall(r"Document (\d+):\nArticle (\d) paragraph (\d)\.", example.document)
        assert [int(n) for n, _, _ in docs] == list(range(1, len(docs) + 1))
        article, paragraph = re.search(r"follows w(\d)(\d)0\?", example.question).groups()
        assert example.references == [f"w{article}{paragraph}1"]  # duplicate answers folded
        shown = [(a, p) for _, a, p in docs]
        assert shown.count((article, paragraph)) == 1
        assert len(shown) == len(set(shown)) == 4  # 4 of the 9 paragraphs fit 1K: no repeats
        assert {(article, p) for p in "012"} < set(shown)  # the same article's paragraphs come first
        assert example.num_tokens + 32 <= 1024
        assert example.document.startswith("Answer the question based on the given documents.")
        example = generator.example("qa_2", 1024, index)
        i = re.search(r"Q(\d)\?", example.question).group(1)
        assert example.references == [f"answer {i}"]
        assert all(f"Title {i}-{j}\nSentence {i}-{j}. More text here." in example.document for j in range(3))


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    ("{not json", "not valid JSON"),
    ('{"data": [{"paragraphs": [{"qas": []}]}]}', "data\\[0\\].paragraphs\\[0\\]: missing field 'context'"),
    ('{"data": [{"paragraphs": [{"context": "c", "qas": [{"question": "q", "answers": [], "is_impossible": true}]}]}]}',
     "no answerable question"),
])
def test_bad_qa_file_is_named(tmp_path, content, message):
    path = tmp_path / "squad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        RulerGenerator(RulerConfig(lengths=(1024,), num_per_task=1, tasks=("qa_1",), qa_files={"qa_1": str(path)}))


def test_ruler_string_match_scores_by_hand():
    all_, part = REWARDS["ruler_match_all"], REWARDS["ruler_match_part"]
    refs = join_references(["1234567", "ABC-def", "7654321"])
    assert all_("numbers: 1234567 and abc-DEF", refs) == pytest.approx(2 / 3)
    assert all_("1234567, 7654321, abc-def", refs) == 1.0
    assert all_("none of them", refs) == 0.0
    assert all_("123456", join_references(["1234567"])) == 0.0  # containment, not overlap
    assert part("it is Paris, France", join_references(["london", "PARIS"])) == 1.0
    assert part("Lyon", join_references(["london", "paris"])) == 0.0
    with pytest.raises(ValueError, match="one line"):
        join_references(["a\nb"])
    config = RewardConfig()  # the default per-task table knows RULER's tasks
    assert config.reward_name("niah_multivalue") == "ruler_match_all"
    assert config.reward_name("qa_2") == "ruler_match_part"


def _scored(task, length, scores):
    item = EvalItem(id="x", prompt_ids=(), reference="r", task=task, family=task, length_bucket=length, depth="n/a")
    return [ScoredItem(item, "", s) for s in scores]


def test_table_averages_tasks_not_items():
    scored = (_scored("niah_single_1", "4k", [1, 0]) + _scored("vt", "4k", [1])
              + _scored("niah_single_1", "8k", [0, 0, 0, 1]) + _scored("vt", "8k", [0.5]))
    files = ruler_files(EvalTable(scored), label="student")
    markdown = files["ruler.md"]
    assert "| task | 4k | 8k | avg |" in markdown
    assert "| niah_single_1 | 50.0 | 25.0 | 37.5 |" in markdown
    assert "| vt | 100.0 | 50.0 | 75.0 |" in markdown
    assert "| **average** | 75.0 | 37.5 | 56.2 |" in markdown  # (50+100)/2, (25+50)/2, their mean
    assert "| student | 75.0 | 37.5 | 56.2 |" in markdown
    assert markdown.index("niah_single_1") < markdown.index("| vt")  # RULER's task order
    summary = json.loads(files["ruler.json"])
    assert summary["average"] == {"4k": 75.0, "8k": 37.5} and summary["overall"] == 56.25


def _oracle(prompt: str) -> str:
    """Answers NIAH from the prompt text: every value of the queried keys, else nothing."""
    keys = re.search(r"special magic \w+ for (.+) mentioned in the provided text\?", prompt)
    if not keys:
        return "I do not know."
    values = []
    for key in re.split(r", and |, ", keys.group(1)):
        values += re.findall(rf"for {re.escape(key)} is: (\S+)\.", prompt)
    return "Answer: " + ", ".join(values)


def test_data_ruler_files_and_eval_suite_ruler(tmp_path, hf_tokenizer_dir):
    out = tmp_path / "ruler"
    assert main(["data", "ruler", "--out", str(out), "--lengths", "8k,16k", "--num-per-task", "2",
                 "--ruler-tasks", "niah_single_1,niah_multivalue,vt", "--tokenizer", str(hf_tokenizer_dir)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "16k-niah_multivalue.parquet", "16k-niah_single_1.parquet", "16k-vt.parquet",
        "8k-niah_multivalue.parquet", "8k-niah_single_1.parquet", "8k-vt.parquet"]
    assert main(["data", "ruler", "--out", str(out), "--lengths", "8k"]) == 2  # never overwritten

    parser = argparse.ArgumentParser()
    add_eval_data_arguments(parser)
    args = parser.parse_args(["--suite", "ruler", "--data", str(out), "--tokenizer", str(hf_tokenizer_dir),
                              "--report-dir", str(tmp_path / "report"), "--batch-size", "5"])
    prompts = []
    tokenizer = load_chat_tokenizer(hf_tokenizer_dir)

    def generate(batch):  # prompts arrive as token ids
        texts = [tokenizer.decode(list(ids)) for ids in batch]
        prompts.extend(texts)
        return [_oracle(p) for p in texts]

    table = evaluate_from_args(args, generate)
    assert len(prompts) == 12 and all("End your reply" not in p for p in prompts)  # RULER's own wording
    assert table.score("niah_single_1") == 100.0 and table.score("niah_multivalue") == 100.0
    assert table.score("vt") == 0.0
    markdown = (tmp_path / "report" / "ruler.md").read_text()
    assert "| **average** | 66.7 | 66.7 | 66.7 |" in markdown
    predictions = [json.loads(line) for line in (tmp_path / "report" / "predictions.jsonl").open()]
    assert {p["family"] for p in predictions} == {"niah_single_1", "niah_multivalue", "vt"}

    # generated on the fly from the same options: the same prompts
    args = parser.parse_args(["--suite", "ruler", "--lengths", "8k,16k", "--num-per-task", "2",
                              "--ruler-tasks", "niah_single_1,niah_multivalue,vt", "--tokenizer",
                              str(hf_tokenizer_dir), "--report-dir", str(tmp_path / "report2")])
    again = []
    evaluate_from_args(args, lambda batch: again.extend(tokenizer.decode(list(ids)) for ids in batch)
                       or [_oracle(tokenizer.decode(list(ids))) for ids in batch])
    assert sorted(again) == sorted(prompts)
