"""`dgrpo eval` end to end: a converted checkpoint, generated tasks, the embedded engine.

Reference: the same weights as a `transformers` Qwen3 decoding greedily from the same
prompts; the eval's recorded responses must be exactly those texts.
"""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from megatron_dgrpo.cli import main

pytestmark = pytest.mark.multiproc  # starts a separate Megatron process


def _dgrpo(*args):
    return subprocess.run([sys.executable, "-m", "megatron_dgrpo.cli", *args],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory, hf_tokenizer_dir):
    from megatron_dgrpo.data.chat import load_chat_tokenizer
    from megatron_dgrpo.models.presets import get_preset
    from megatron_dgrpo.testing.tiny_models import write_random_qwen3

    root = tmp_path_factory.mktemp("eval")
    tokenizer = load_chat_tokenizer(hf_tokenizer_dir)
    config = dataclasses.replace(get_preset("tiny-qwen3"), vocab_size=tokenizer.vocab_size)
    hf_model = write_random_qwen3(config, root / "hf", root / "ckpt", seed=0)
    assert main(["data", "synth", "--out", str(root / "data"), "--num", "6", "--lengths", "256",
                 "--seed", "1"]) == 0
    return root, hf_model.eval(), tokenizer


def test_eval_responses_equal_transformers_greedy(eval_setup, hf_tokenizer_dir):
    from megatron_dgrpo.data.chat import IM_END
    from megatron_dgrpo.data.longblocks import LongBlocksConfig, LongBlocksLoader

    root, hf_model, tokenizer = eval_setup
    result = _dgrpo("eval", "--checkpoint", str(root / "ckpt"), "--data", str(root / "data"),
                    "--tokenizer", str(hf_tokenizer_dir), "--report-dir", str(root / "report"),
                    "--max-new-tokens", "6", "--limit", "3", "--batch-size", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = [json.loads(line) for line in (root / "report" / "predictions.jsonl").open()]
    assert len(predictions) == 3
    assert json.loads((root / "report" / "scores.json").read_text())["cells"]

    loader = LongBlocksLoader(LongBlocksConfig(paths=(str(root / "data"),), split="all"), tokenizer)
    examples = [e for _, e in zip(range(3), loader)]
    assert [e.id for e in examples] == [p["id"] for p in predictions]
    for example, prediction in zip(examples, predictions):
        with torch.no_grad():
            ids = hf_model.generate(torch.tensor([example.prompt_ids]), max_new_tokens=6,
                                    do_sample=False, pad_token_id=0)[0, len(example.prompt_ids):]
        expected = tokenizer.decode(ids.tolist()).split(IM_END, 1)[0]
        assert prediction["response"] == expected


def test_eval_refuses_a_tokenizer_larger_than_the_model(eval_setup, sp_model_path, tmp_path):
    root, _, _ = eval_setup
    result = _dgrpo("eval", "--checkpoint", str(root / "ckpt"), "--data", str(root / "data"),
                    "--tokenizer", str(sp_model_path), "--report-dir", str(tmp_path / "r"))
    assert result.returncode == 2
    assert "do not belong together" in result.stderr
    assert not (tmp_path / "r").exists()


def test_eval_suite_short_through_the_command(eval_setup, hf_tokenizer_dir, tmp_path):
    root, _, _ = eval_setup
    data = tmp_path / "retention.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i),
                                        "metric": "numeric_match"}) + "\n" for i in range(3)))
    result = _dgrpo("eval", "--checkpoint", str(root / "ckpt"), "--suite", "short", "--data", str(data),
                    "--tokenizer", str(hf_tokenizer_dir), "--report-dir", str(tmp_path / "report"),
                    "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = [json.loads(line) for line in (tmp_path / "report" / "predictions.jsonl").open()]
    assert [p["id"] for p in predictions] == ["retention-1", "retention-2", "retention-3"]
    assert "| retention |" in result.stdout
