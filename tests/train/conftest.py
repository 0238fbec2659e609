"""Fixtures shared by the trainer tests."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

TEACHER_TOPK = 8  # k of the cached teacher top-k


@dataclasses.dataclass
class TeacherWithCache:
    """A random small-qwen3 teacher as ``root/hf`` (transformers) and ``root/teacher``
    (Megatron), 6 tasks in ``root/data`` and the Megatron teacher's top-k cache of the first
    4 of them in ``root/cache`` (``tools/cache_teacher_topk.py``, k = ``TEACHER_TOPK``)."""

    root: Path
    hf_teacher: Any  # the transformers model, in eval mode
    tokenizer: Any
    tokenizer_dir: Path
    topk: int = TEACHER_TOPK


@pytest.fixture(scope="session")
def teacher_with_cache(tmp_path_factory, hf_tokenizer_dir) -> TeacherWithCache:
    from megatron_dgrpo.cli import main
    from megatron_dgrpo.data.chat import load_chat_tokenizer
    from megatron_dgrpo.models.presets import get_preset
    from megatron_dgrpo.testing.tiny_models import write_random_qwen3

    root = tmp_path_factory.mktemp("teacher-with-cache")
    tokenizer = load_chat_tokenizer(hf_tokenizer_dir)
    config = dataclasses.replace(get_preset("small-qwen3"), vocab_size=tokenizer.vocab_size)
    teacher = write_random_qwen3(config, root / "hf", root / "teacher", seed=1)
    assert main(["data", "synth", "--out", str(root / "data"), "--num", "6", "--lengths", "256",
                 "--seed", "5"]) == 0
    result = subprocess.run(
        [sys.executable, "tools/cache_teacher_topk.py", "--teacher", str(root / "teacher"),
         "--tokenizer", str(hf_tokenizer_dir), "--data", str(root / "data"),
         "--out", str(root / "cache"), "--k", str(TEACHER_TOPK), "--limit", "4"],
        check=False, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return TeacherWithCache(root, teacher.eval(), tokenizer, Path(hf_tokenizer_dir))


@pytest.fixture(scope="session")
def make_synth_setup(tmp_path_factory, hf_tokenizer_dir):
    """Factory ``make(name, num, seed)`` -> ``(root, tokenizer dir, vocabulary size)``: a new
    directory with ``num`` synthetic 256-token tasks in ``root/data`` (``dgrpo data synth``)."""
    from megatron_dgrpo.cli import main
    from megatron_dgrpo.data.chat import load_chat_tokenizer

    vocab = load_chat_tokenizer(hf_tokenizer_dir).vocab_size

    def make(name: str, num: int, seed: int):
        root = tmp_path_factory.mktemp(name)
        assert main(["data", "synth", "--out", str(root / "data"), "--num", str(num),
                     "--lengths", "256", "--seed", str(seed)]) == 0
        return root, hf_tokenizer_dir, vocab

    return make
