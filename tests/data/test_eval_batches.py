"""Evaluation batches by prompt length (what `dgrpo eval` and the in-training evaluation
generate), the end-of-turn token generation stops at, and the training rows' ids."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_dgrpo.data.chat import load_chat_tokenizer
from megatron_dgrpo.data.evaluate import NO_DEPTH, EvalItem, length_batches, score_items
from megatron_dgrpo.data.heldout import read_training_rows
from megatron_dgrpo.data.longblocks import LongBlocksConfig, split_of


def test_batches_group_similar_lengths_within_windows():
    lengths = [5, 1, 9, 3, 3, 7, 2, 8, 6]
    # one window of all 9 (batch 2 x 8 batches): sorted 1(1) 2(6) 3(3) 3(4) 5(0) 6(8) 7(5) 8(7)
    # 9(2), cut in pairs, each pair in item order
    assert length_batches(lengths, 2) == [[1, 6], [3, 4], [0, 8], [5, 7], [2]]
    # windows of 2 x 2 = 4 items: [5, 1, 9, 3] -> 1 3 | 5 9; [3, 7, 2, 8] -> 2 3 | 7 8; [6]
    assert length_batches(lengths, 2, window_batches=2) == [[1, 3], [0, 2], [4, 6], [5, 7], [8]]
    with pytest.raises(ValueError, match="batch_size and window_batches must be positive"):
        length_batches(lengths, 0)


def _item(index: int, length: int) -> EvalItem:
    return EvalItem(id=f"q{index}", prompt_ids=tuple(range(1, length + 1)), reference=str(length),
                    task="count_items", family="synthesis", length_bucket="16", depth=NO_DEPTH)


def test_score_items_generates_by_length_and_answers_in_item_order():
    items = [_item(i, n) for i, n in enumerate([5, 1, 9, 3, 3, 7, 2, 8, 6])]
    calls = []

    def generate(prompts):  # answers each prompt with its length: right for every item
        calls.append([len(p) for p in prompts])
        return [f"Answer: {len(p)}" for p in prompts]

    scored = score_items(items, generate, lambda item, response: float(
        response == f"Answer: {item.reference}"), batch_size=2)
    assert calls == [[1, 2], [3, 3], [5, 6], [7, 8], [9]]
    assert [s.item.id for s in scored] == [f"q{i}" for i in range(9)]
    assert [s.response for s in scored] == [f"Answer: {n}" for n in [5, 1, 9, 3, 3, 7, 2, 8, 6]]
    assert all(s.score == 1.0 for s in scored)


def test_end_of_turn_token(hf_tokenizer_dir, sp_model_path):
    for path in (hf_tokenizer_dir, sp_model_path):
        tokenizer = load_chat_tokenizer(path)
        eot = tokenizer.end_of_turn_id
        assert tokenizer.decode([eot]) == "<|im_end|>"
        assert tokenizer.response_ids("q", "Paris")[-2:] == [eot, *tokenizer.encode("\n")]


def test_training_rows_are_those_the_loader_keeps_by_choice(tmp_path):
    rows = [{"id": f"r{i}", "document": None if i == 3 else "doc", "source": "wiki",
             "language": "de" if i == 4 else "en", "question": "Q?", "answer": f"a{i % 2}",
             "task_family": "synthesis", "task": "count_items", "question_template": "t"}
            for i in range(40)]
    rows[5]["answer"] = " "  # an unusable answer: never trains
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "part.parquet")
    config = LongBlocksConfig(paths=(str(tmp_path),), validation_fraction=0.3, languages=("en",))
    training = read_training_rows(config)
    expected = [r for r in rows if r["id"] not in ("r4", "r5")
                and split_of(r["id"], 0.3) == "train"]
    assert 20 < len(expected) < 38  # both splits are exercised
    assert training.ids == {r["id"] for r in expected}  # r3 (no document) counts: erring safe
    assert [(f.family, f.task, f.template, f.reference) for f in training.fit_rows] == [
        ("synthesis", "count_items", "t", r["answer"]) for r in expected]
