"""LongBlocks loader: schema, bad rows skipped and counted, filters, splits, chat templates."""

import pyarrow as pa
import pytest

from megatron_dgrpo.data.chat import HFChatTokenizer, SentencePieceChatTokenizer, load_chat_tokenizer
from megatron_dgrpo.data.longblocks import LongBlocksConfig, LongBlocksLoader, split_of
from megatron_dgrpo.data.schema import PUBLIC_COLUMNS, PUBLIC_SCHEMA, TEACHER_COLUMNS


@pytest.fixture(params=["hf", "sentencepiece"])
def tokenizer(request, hf_tokenizer_dir, sp_model_path):
    return load_chat_tokenizer(hf_tokenizer_dir if request.param == "hf" else sp_model_path)


def load(tmp_path, tokenizer, **options):
    config = LongBlocksConfig(paths=(str(tmp_path),), split="all", **options)
    loader = LongBlocksLoader(config, tokenizer)
    return list(loader), loader.summary


def test_good_rows_become_chat_prompts_with_references_and_teachers(
    tmp_path, tokenizer, public_row, write_parquet
):
    write_parquet(tmp_path / "a.parquet", [public_row(0), public_row(1)], schema=PUBLIC_SCHEMA)
    examples, summary = load(tmp_path, tokenizer)
    assert summary.kept == 2 and not summary.skipped and not summary.filtered
    first = examples[0]
    assert first.prompt.startswith(
        "<|im_start|>user\nDocument 0. The sky in this story is green.\n\nWhat colour"
    )
    assert first.prompt.endswith('"Answer: unanswerable".<|im_end|>\n<|im_start|>assistant\n')
    assert tokenizer.decode(first.prompt_ids) == first.prompt
    assert first.reference_answer == "green"
    assert first.teacher_responses == {TEACHER_COLUMNS[0]: "Answer: green"}  # null and empty ones are absent
    assert first.metadata == {}


def test_bad_rows_are_skipped_and_counted_never_raised(tmp_path, tokenizer, public_row, write_parquet):
    rows = [
        public_row(0),
        public_row(1, document=None),
        public_row(2, question=""),
        public_row(3, answer="   "),
        public_row(4, document="word " * 3000),  # over the prompt budget
        public_row(5),
    ]
    write_parquet(tmp_path / "a.parquet", rows, schema=PUBLIC_SCHEMA)
    typed = [dict(public_row(6), id=6)]  # an integer id column: wrong type
    write_parquet(tmp_path / "b.parquet", typed)
    no_language = [{k: v for k, v in public_row(7).items() if k != "language"}]
    write_parquet(tmp_path / "c.parquet", no_language)
    teacher_list = [dict(public_row(8), **{TEACHER_COLUMNS[1]: ["not", "a", "string"]})]
    write_parquet(tmp_path / "d.parquet", teacher_list)
    (tmp_path / "e.parquet").write_bytes(b"this is not parquet")
    examples, summary = load(tmp_path, tokenizer, max_prompt_tokens=2000)
    assert [e.id for e in examples] == ["row-0", "row-5"]
    assert summary.kept == 2
    assert dict(summary.skipped) == {
        "missing document": 1,
        "empty question": 1,
        "empty answer": 1,
        "over_length": 1,
        "wrong_type id": 1,
        "missing language": 1,
        f"wrong_type {TEACHER_COLUMNS[1]}": 1,
    }
    assert summary.unreadable_files == 1
    assert summary.skipped_tokens["over_length"] > 2000 and len(summary.skipped_tokens) == 1
    assert summary.kept_tokens == sum(e.num_prompt_tokens for e in examples)
    text = summary.format()
    assert "kept 2 rows" in text and "skipped 7 rows (77.8% of the rows not filtered out" in text
    assert "missing document: 1 rows, tokens unknown: no document" in text
    assert f"over_length: 1 rows, {summary.skipped_tokens['over_length']:,} prompt tokens" in text
    assert "empty question: 1 rows, tokens unknown: not tokenized" in text
    assert text.endswith("; 1 unreadable files")


def test_length_language_and_source_filters(tmp_path, tokenizer, public_row, write_parquet):
    rows = [
        public_row(0),
        public_row(1, language="fr"),
        public_row(2, source="code"),
        public_row(3, document="short"),
    ]
    write_parquet(tmp_path / "a.parquet", rows, schema=PUBLIC_SCHEMA)
    sizes = [len(e.prompt_ids) for e in load(tmp_path, tokenizer)[0]]
    examples, summary = load(
        tmp_path, tokenizer, languages=("en",), sources=("wiki",), min_prompt_tokens=min(sizes) + 1
    )
    assert [e.id for e in examples] == ["row-0"]
    assert dict(summary.filtered) == {"language": 1, "source": 1}
    assert dict(summary.skipped) == {"under_length": 1}


def test_split_by_id_hash_is_deterministic_disjoint_and_sized(
    tmp_path, public_row, write_parquet, hf_tokenizer_dir
):
    rows = [public_row(i) for i in range(400)]
    write_parquet(tmp_path / "a.parquet", rows[:200], schema=PUBLIC_SCHEMA)
    write_parquet(tmp_path / "b.parquet", rows[200:], schema=PUBLIC_SCHEMA)
    tokenizer = load_chat_tokenizer(hf_tokenizer_dir)

    def ids(split):
        config = LongBlocksConfig(paths=(str(tmp_path),), split=split, validation_fraction=0.25, batch_rows=7)
        return [e.id for e in LongBlocksLoader(config, tokenizer)]

    train, validation = ids("train"), ids("validation")
    assert set(train).isdisjoint(validation) and len(train) + len(validation) == 400
    assert 60 <= len(validation) <= 140  # 25% of 400, binomial sd ~ 8.7
    assert all(split_of(i, 0.25) == "validation" for i in validation)
    reordered = tmp_path / "reordered"
    write_parquet(reordered / "x.parquet", rows[::-1], schema=PUBLIC_SCHEMA)
    config = LongBlocksConfig(paths=(str(reordered),), split="validation", validation_fraction=0.25)
    assert sorted(e.id for e in LongBlocksLoader(config, tokenizer)) == sorted(validation)


def test_chat_rendering_prompt_plus_response_is_the_conversation(hf_tokenizer_dir, sp_model_path):
    hf = load_chat_tokenizer(hf_tokenizer_dir)
    sp = load_chat_tokenizer(sp_model_path)
    assert isinstance(hf, HFChatTokenizer) and isinstance(sp, SentencePieceChatTokenizer)
    for tok in (hf, sp):
        assert tok.render_response("hi", "green") == "green<|im_end|>\n"
    conversation = hf.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "green"}], tokenize=False
    )
    assert hf.render_prompt("hi") + hf.render_response("hi", "green") == conversation
    assert sp.encode("<|im_end|>") == [sp.processor.piece_to_id("<|im_end|>")]  # marker is one token


def test_config_validation_names_the_bad_option(tmp_path):
    with pytest.raises(ValueError, match="paths"):
        LongBlocksConfig().validate()
    with pytest.raises(ValueError, match="split"):
        LongBlocksConfig(paths=("x",), split="dev").validate()
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        LongBlocksConfig(paths=("x",), min_prompt_tokens=10, max_prompt_tokens=5).validate()
    with pytest.raises(ValueError, match="does not exist"):
        list(LongBlocksLoader(LongBlocksConfig(paths=(str(tmp_path / "missing"),)), None))


def test_public_schema_has_the_exact_columns():
    assert PUBLIC_COLUMNS == (
        "id",
        "document",
        "source",
        "language",
        "question",
        "answer",
        "response_Qwen3-Next-80B-A3B",
        "response_Qwen3.5-27B",
        "response_Nemotron-3-Nano-30B-A3B",
    )
    assert all(field.type == pa.string() for field in PUBLIC_SCHEMA)
