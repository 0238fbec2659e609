"""Fixtures for the model tests: tiny sharded Hugging Face checkpoints on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from hf_tiny_models import build_hf_model, save_hf_dir, tiny_config


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> dict[bool, Path]:
    """tied -> directory of a sharded tiny Qwen3 checkpoint (config.json, index, shards)."""
    root = tmp_path_factory.mktemp("hf")
    return {tied: save_hf_dir(build_hf_model(tiny_config(tied), seed=10 + tied),
                              root / f"tied_{tied}") for tied in (True, False)}
