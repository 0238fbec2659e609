"""`dgrpo data synth` and `dgrpo data prepare`: outputs, schema, refusal to overwrite, atomicity."""

import argparse
import json

import pyarrow.parquet as pq
import pytest

from megatron_dgrpo.data.chat import load_chat_tokenizer
from megatron_dgrpo.data.cli import add_prepare_arguments, add_synth_arguments, run_prepare, run_synth
from megatron_dgrpo.data.longblocks import LongBlocksConfig, LongBlocksLoader
from megatron_dgrpo.data.schema import PUBLIC_COLUMNS, PUBLIC_SCHEMA, SYNTH_SCHEMA
from megatron_dgrpo.data.synth import SynthConfig, SynthGenerator
from megatron_dgrpo.data.synth.writer import write_synth_dataset


def synth(argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_synth_arguments(parser)
    return run_synth(parser.parse_args(argv.split()))


def test_synth_writes_sharded_parquet_in_the_public_schema_plus_metadata(tmp_path, capsys):
    out = tmp_path / "synth"
    assert (
        synth(f"--out {out} --num 30 --lengths 256,512 --tasks multihop,synthesis --seed 3 --shard-size 12")
        == 0
    )
    shards = sorted(out.glob("*.parquet"))
    assert [p.name for p in shards] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    table = pq.read_table(out)
    assert table.schema.names[: len(PUBLIC_COLUMNS)] == list(PUBLIC_COLUMNS)
    assert table.schema == SYNTH_SCHEMA
    assert table.num_rows == 30
    assert set(table.column("task").to_pylist()) == {"multihop", "list_items", "count_items", "sum_values"}
    assert set(table.column("length_bucket").to_pylist()) == {"256", "512"}
    expected = SynthGenerator(
        SynthConfig(lengths=(256, 512), tasks=("multihop", "synthesis"), seed=3)
    ).example(17)
    assert table.slice(17, 1).to_pylist()[0]["document"] == expected.document
    assert "wrote 30 examples in 3 shards" in capsys.readouterr().out


def test_synth_refuses_a_non_empty_output_and_leaves_it_untouched(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert synth(f"--out {out} --num 2 --lengths 256") == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert synth(f"--out {empty} --num 2 --lengths 256") == 0  # an empty directory is fine


def test_bad_arguments_are_reported_not_raised(tmp_path, capsys):
    assert synth(f"--out {tmp_path / 'o'} --num 2 --tasks riddles") == 2
    assert "unknown task 'riddles'" in capsys.readouterr().err
    assert synth(f"--out {tmp_path / 'o'} --num 2 --lengths 4q") == 2
    assert not (tmp_path / "o").exists()


def test_failed_generation_leaves_no_partial_output(tmp_path):
    out = tmp_path / "never"
    config = SynthConfig(num_examples=5, lengths=(256,))

    def fail_after_first_shard(done: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_synth_dataset(config, out, shard_size=2, on_shard_done=fail_after_first_shard)
    assert list(tmp_path.iterdir()) == []


def test_output_does_not_depend_on_worker_count(tmp_path):
    config = SynthConfig(num_examples=9, lengths=(256,), seed=5)
    write_synth_dataset(config, tmp_path / "one", shard_size=4, workers=1)
    write_synth_dataset(config, tmp_path / "two", shard_size=4, workers=2)
    assert pq.read_table(tmp_path / "one").equals(pq.read_table(tmp_path / "two"))


def test_loader_reads_synthetic_output_with_its_metadata(tmp_path, hf_tokenizer_dir):
    assert synth(f"--out {tmp_path / 's'} --num 8 --lengths 256 --tasks document") == 0
    loader = LongBlocksLoader(
        LongBlocksConfig(paths=(str(tmp_path / "s"),), split="all"), load_chat_tokenizer(hf_tokenizer_dir)
    )
    examples = list(loader)
    assert loader.summary.kept == 8 and not loader.summary.skipped
    assert {e.metadata["task"] for e in examples} == {"section_lookup", "event_order"}
    assert all(e.teacher_responses == {} and e.source == "synthetic" for e in examples)


def test_prepare_writes_tokenized_shards_and_a_summary(tmp_path, hf_tokenizer_dir, public_row, write_parquet):
    rows = [public_row(0), public_row(1, answer=""), public_row(2, language="de")]
    write_parquet(tmp_path / "in" / "a.parquet", rows, schema=PUBLIC_SCHEMA)
    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    args = parser.parse_args(
        [
            "--data",
            str(tmp_path / "in"),
            "--tokenizer",
            str(hf_tokenizer_dir),
            "--out",
            str(tmp_path / "out"),
            "--split",
            "all",
            "--languages",
            "en",
        ]
    )
    assert run_prepare(args) == 0
    table = pq.read_table(tmp_path / "out" / "part-00000.parquet").to_pylist()
    assert [r["id"] for r in table] == ["row-0"]
    tokenizer = load_chat_tokenizer(hf_tokenizer_dir)
    assert tokenizer.decode(table[0]["answer_ids"]) == "green<|im_end|>\n"
    assert tokenizer.decode(table[0]["response_Qwen3-Next-80B-A3B_ids"]) == "Answer: green<|im_end|>\n"
    assert table[0]["response_Qwen3.5-27B_ids"] is None
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary == {"kept": 1, "kept_tokens": len(table[0]["prompt_ids"]),
                       "skipped": {"empty answer": 1}, "skipped_tokens": {},
                       "filtered": {"language": 1}, "unreadable_files": 0}
    assert run_prepare(args) == 2  # refuses to overwrite
