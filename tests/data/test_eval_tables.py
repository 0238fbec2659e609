"""Evaluation tables from a deterministic program "model" whose accuracy depends on depth and length."""

import json

import pyarrow.parquet as pq
import pytest

from megatron_dgrpo.data.chat import load_chat_tokenizer
from megatron_dgrpo.data.evaluate import evaluate, length_bucket_of
from megatron_dgrpo.data.longblocks import LongBlocksConfig, LongBlocksLoader
from megatron_dgrpo.data.schema import PUBLIC_SCHEMA
from megatron_dgrpo.data.synth import SynthConfig
from megatron_dgrpo.data.synth.writer import write_synth_dataset


@pytest.fixture(scope="module")
def synthetic_examples(tmp_path_factory, hf_tokenizer_dir):
    out = tmp_path_factory.mktemp("eval") / "data"
    # section_lookup is left out: its fact goes to a uniformly drawn section, not to the depth grid
    tasks = ("multihop", "grounding", "synthesis", "event_order")
    config = SynthConfig(num_examples=2 * 7 * 3 * 2, lengths=(256, 512), depths=(0.0, 0.5, 1.0), seed=11,
                         tasks=tasks)
    write_synth_dataset(config, out, shard_size=20)
    loader = LongBlocksLoader(
        LongBlocksConfig(paths=(str(out),), split="all"), load_chat_tokenizer(hf_tokenizer_dir)
    )
    return list(loader)


def shallow_oracle(examples):
    """Answers right (in the `Answer:` convention) iff depth < 0.75, and at 512 tokens only at depth 0."""
    by_prompt = {tuple(e.prompt_ids): e for e in examples}

    def generate(prompts):
        responses = []
        for prompt in map(tuple, prompts):
            meta = by_prompt[prompt].metadata
            depth_limit = 0.75 if meta["length_bucket"] == "256" else 0.25
            right = meta["needle_depth_target"] < depth_limit
            answer = by_prompt[prompt].reference_answer if right else "zzz"
            responses.append(f"Reading the document...\nAnswer: {answer}")
        return responses

    return generate


def test_table_numbers_follow_the_oracle(synthetic_examples, tmp_path):
    calls = []
    oracle = shallow_oracle(synthetic_examples)

    def generate(prompts):
        calls.append(len(prompts))
        return oracle(prompts)

    table = evaluate(synthetic_examples, generate, out_dir=tmp_path, batch_size=7)
    assert sum(calls) == 84 and max(calls) == 7
    assert table.lengths == ["256", "512"] and table.depths == ["0", "0.5", "1"]
    assert table.families == ["document", "grounding", "multihop", "synthesis"]
    # 256 tokens: depths 0 and 0.5 right, 1 wrong; 512 tokens: only depth 0 right
    assert table.score(length_bucket="256") == pytest.approx(200 / 3)
    assert table.score(length_bucket="512") == pytest.approx(100 / 3)
    assert table.score() == pytest.approx(50.0)
    assert table.score("multihop", "256", "0.5") == 100.0
    assert table.score("synthesis", "512", "0.5") == 0.0
    assert table.score(depth="0") == 100.0 and table.score(depth="1") == 0.0
    assert table.cells[("all", "all", "all")].count == 84

    markdown = (tmp_path / "scores.md").read_text()
    assert "| family | 256 | 512 | all |" in markdown
    assert "| multihop | 66.7 | 33.3 | 50.0 |" in markdown
    assert "| 0.5 | 100.0 | 0.0 | 50.0 |" in markdown
    cells = json.loads((tmp_path / "scores.json").read_text())["cells"]
    grounding = next(
        c for c in cells if c["family"] == "grounding" and c["length_bucket"] == "512" and c["depth"] == "0"
    )
    assert grounding == {
        "family": "grounding",
        "length_bucket": "512",
        "depth": "0",
        "count": 4,
        "score": 100.0,
    }
    assert (tmp_path / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wrong_answer_formats_and_partial_rewards_score_as_documented(synthetic_examples):
    lists = [e for e in synthetic_examples if e.metadata["task"] == "list_items"]

    def half_the_items(prompts):
        reference = {tuple(e.prompt_ids): e.reference_answer.split("; ") for e in lists}
        return [f"<answer>{'; '.join(reference[p][: len(reference[p]) // 2 or 1])}</answer>"
                for p in map(tuple, prompts)]

    table = evaluate(lists, half_the_items)
    expected = []
    for e in lists:
        items = len(e.reference_answer.split("; "))
        kept = items // 2 or 1
        expected.append(2 * (kept / items) / (1 + kept / items))  # set F1 with precision 1
    assert table.score() == pytest.approx(100 * sum(expected) / len(expected))


def test_public_rows_are_grouped_by_source_and_prompt_length(
    tmp_path, public_row, write_parquet, hf_tokenizer_dir
):
    write_parquet(
        tmp_path / "a.parquet", [public_row(0), public_row(1, source="books")], schema=PUBLIC_SCHEMA
    )
    examples = list(
        LongBlocksLoader(
            LongBlocksConfig(paths=(str(tmp_path),), split="all"), load_chat_tokenizer(hf_tokenizer_dir)
        )
    )
    table = evaluate(examples, lambda prompts: ["Answer: green"] * len(prompts))
    assert table.families == ["longblocks:books", "longblocks:wiki"]
    assert table.depths == ["n/a"]
    assert table.lengths == [length_bucket_of(examples[0].num_prompt_tokens)]
    assert table.score() == 100.0


def test_length_buckets_and_generate_contract():
    assert [length_bucket_of(n) for n in (1, 1000, 1024, 1025, 3000)] == ["1", "1k", "1k", "2k", "4k"]
    with pytest.raises(ValueError, match="2 responses for 1 prompts"):
        evaluate([_Stub()], lambda prompts: ["a", "b"])


class _Stub:
    id, prompt_ids, reference_answer, source, num_prompt_tokens, metadata = "x", [1], "r", "wiki", 10, {}


def test_eval_command_data_side_writes_the_report_and_refuses_existing_output(
    tmp_path, public_row, write_parquet, hf_tokenizer_dir, capsys
):
    import argparse

    from megatron_dgrpo.data.cli import add_eval_data_arguments, evaluate_from_args
    from megatron_dgrpo.outputs import OutputExistsError

    write_parquet(tmp_path / "data" / "a.parquet", [public_row(i) for i in range(5)], schema=PUBLIC_SCHEMA)
    parser = argparse.ArgumentParser()
    add_eval_data_arguments(parser)
    argv = ["--data", str(tmp_path / "data"), "--tokenizer", str(hf_tokenizer_dir), "--limit", "3"]
    prompts_seen = []

    def generate(prompts):
        prompts_seen.extend(prompts)
        return ["Answer: green", "Answer: blue", "Answer: green"][: len(prompts)]

    table = evaluate_from_args(parser.parse_args([*argv, "--report-dir", str(tmp_path / "report")]), generate)
    assert len(prompts_seen) == 3 and table.score() == pytest.approx(200 / 3)
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "heatmap.png",
        "predictions.jsonl",
        "scores.json",
        "scores.md",
    ]
    predictions = [json.loads(line) for line in (tmp_path / "report" / "predictions.jsonl").open()]
    assert [p["response"] for p in predictions] == ["Answer: green", "Answer: blue", "Answer: green"]
    assert [p["score"] for p in predictions] == [1.0, 0.0, 1.0]
    assert "prompt" not in predictions[0]
    printed = capsys.readouterr().out
    assert "| longblocks:wiki | 66.7 | 66.7 | 100.0 |" in printed  # in-sample baseline: "green" on all
    assert "fit on the evaluated data itself (in-sample" in printed
    with pytest.raises(OutputExistsError, match="already exists and is not empty"):
        evaluate_from_args(parser.parse_args([*argv, "--report-dir", str(tmp_path / "report")]), generate)
    assert len(prompts_seen) == 3  # refused before generating anything


def test_eval_command_prints_a_baseline_fit_on_training_data(tmp_path, hf_tokenizer_dir, capsys):
    import argparse

    from megatron_dgrpo.data.cli import add_eval_data_arguments, evaluate_from_args

    for name, seed in (("train", 0), ("heldout", 1)):
        write_synth_dataset(SynthConfig(num_examples=24, lengths=(256,), tasks=("count_items",), seed=seed,
                                        filler_bank_size=200), tmp_path / name)
    train_answers = [r["answer"] for r in pq.read_table(tmp_path / "train").to_pylist()]
    mode = max(train_answers, key=lambda a: (train_answers.count(a), -train_answers.index(a)))
    heldout = pq.read_table(tmp_path / "heldout").to_pylist()
    expected = 100 * sum(r["answer"] == mode for r in heldout) / len(heldout)
    parser = argparse.ArgumentParser()
    add_eval_data_arguments(parser)
    args = parser.parse_args(["--data", str(tmp_path / "heldout"), "--tokenizer", str(hf_tokenizer_dir),
                              "--report-dir", str(tmp_path / "report"),
                              "--baseline-data", str(tmp_path / "train")])
    table = evaluate_from_args(args, lambda prompts: ["Answer: 0"] * len(prompts))
    assert table.baseline.table.score() == pytest.approx(expected)
    printed = capsys.readouterr().out
    assert f"| synthesis | 0.0 | 0.0 | {expected:.1f} |" in printed
    assert f"fit on --baseline-data {tmp_path / 'train'} (24 examples)" in printed
    missing = parser.parse_args(["--data", str(tmp_path / "heldout"), "--tokenizer", str(hf_tokenizer_dir),
                                 "--report-dir", str(tmp_path / "r2"),
                                 "--baseline-data", str(tmp_path / "no")])
    with pytest.raises(ValueError, match="does not exist"):
        evaluate_from_args(missing, lambda prompts: pytest.fail("generated before checking the fit set"))
    assert not (tmp_path / "r2").exists()
