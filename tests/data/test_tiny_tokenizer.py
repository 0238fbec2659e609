"""`dgrpo data tokenizer`: an offline BPE tokenizer the whole pipeline can use."""

from megatron_dgrpo.cli import main
from megatron_dgrpo.data.chat import load_chat_tokenizer


def test_tokenizer_round_trips_and_renders_chatml(tmp_path):
    out = tmp_path / "tok"
    assert main(["data", "tokenizer", "--out", str(out), "--vocab-size", "512"]) == 0
    tokenizer = load_chat_tokenizer(out)
    assert tokenizer.vocab_size == 512
    text = "Zürich, 1,234 km — Answer: unanswerable\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text  # byte-level: lossless
    prompt = tokenizer.render_prompt("What is 2+2?")
    assert prompt == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    end_of_turn = tokenizer.encode("<|im_end|>")
    assert len(end_of_turn) == 1  # a single special token, usable as a stop id


def test_tokenizer_refuses_existing_output_and_tiny_vocab(tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "mine.txt").write_text("keep")
    assert main(["data", "tokenizer", "--out", str(tmp_path / "tok")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert main(["data", "tokenizer", "--out", str(tmp_path / "new"), "--vocab-size", "100"]) == 2
    assert "vocab_size must be >= 300" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
