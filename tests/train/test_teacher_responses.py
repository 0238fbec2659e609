"""`dgrpo data teacher-responses` and `data.target`: a teacher's own responses, written once,
become what SFT and KD train on (the paper's off-policy distillation baselines)."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

from megatron_dgrpo.data.chat import IM_END, reply_text
from megatron_dgrpo.data.longblocks import LongBlocksConfig, LongBlocksLoader
from megatron_dgrpo.train.batch import answer_sequences

MAX_NEW_TOKENS = 6


def _dgrpo(*args):
    return subprocess.run([sys.executable, "-m", "megatron_dgrpo.cli", *args], check=False,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def written(teacher_with_cache, tmp_path_factory):
    shared = teacher_with_cache
    out = tmp_path_factory.mktemp("teacher-responses") / "data"
    result = _dgrpo("data", "teacher-responses", "--teacher", str(shared.root / "teacher"),
                    "--tokenizer", str(shared.tokenizer_dir), "--data", str(shared.root / "data"),
                    "--out", str(out), "--max-new-tokens", str(MAX_NEW_TOKENS))
    assert result.returncode == 0, result.stderr[-3000:]
    return shared, out


def _greedy_reply(model, prompt_ids, tokenizer, vocab):
    """The transformers teacher's greedy continuation, stopped at the end-of-turn text."""
    ids = list(prompt_ids)
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(MAX_NEW_TOKENS):
            logits = model(torch.tensor([ids])).logits[0, -1, :vocab]
            token = int(logits.argmax())
            ids.append(token)
            generated.append(token)
            if IM_END in tokenizer.decode(generated):
                break
    return reply_text(tokenizer.decode(generated))


def test_each_response_is_the_teachers_greedy_reply(written):
    shared, out = written
    tokenizer = shared.tokenizer
    loader = LongBlocksLoader(LongBlocksConfig(paths=(str(out),), split="all"), tokenizer)
    examples = list(loader)
    assert len(examples) == 6
    for example in examples:
        expected = _greedy_reply(shared.hf_teacher, example.prompt_ids, tokenizer,
                                 tokenizer.vocab_size)
        assert example.teacher_responses["response_teacher"] == expected, example.id
    (table_file,) = sorted(out.glob("*.parquet"))
    assert "response_teacher" in pq.read_table(table_file).column_names


def test_sft_and_kd_sequences_train_on_the_chosen_target(written):
    shared, out = written
    tokenizer = shared.tokenizer
    config = LongBlocksConfig(paths=(str(out),), split="all", target="response_teacher")
    examples = list(LongBlocksLoader(config, tokenizer))
    sequences = answer_sequences(examples, tokenizer)
    for row, example in enumerate(examples):
        response = example.teacher_responses["response_teacher"]
        assert example.target_answer == response != example.reference_answer
        answer = sequences.targets[row][sequences.loss_mask[row]].tolist()
        assert answer == tokenizer.response_ids(example.user_message, response)


def test_rows_without_the_target_column_are_skipped_and_counted(written):
    shared, out = written
    loader = LongBlocksLoader(LongBlocksConfig(paths=(str(out),), split="all",
                                               target="response_nobody"), shared.tokenizer)
    assert list(loader) == []
    assert loader.summary.skipped["missing response_nobody"] == 6


def test_bad_arguments_are_refused_before_any_work(written, tmp_path):
    shared, out = written
    common = ["--teacher", str(shared.root / "teacher"), "--tokenizer", str(shared.tokenizer_dir)]
    result = _dgrpo("data", "teacher-responses", *common, "--data", str(out),
                    "--out", str(tmp_path / "x"), "--column", "teacher")
    assert result.returncode == 2 and "--column must be 'response_<name>'" in result.stderr
    result = _dgrpo("data", "teacher-responses", *common, "--data", str(out), "--out", str(out))
    assert result.returncode == 2 and "already exists" in result.stderr
    with pytest.raises(ValueError, match="data.target must be 'reference' or a response column"):
        LongBlocksConfig(paths=(str(out),), target="teacher").validate()
