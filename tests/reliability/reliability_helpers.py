"""Helpers of the reliability tests: the synthetic run set-up, directory digests (what a
failure must not change), and waiting on ``dgrpo`` processes."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch
import yaml


@dataclasses.dataclass
class SynthAssets:
    root: Path
    tokenizer: Path
    data: Path

    def config(self, run_dir: Path, **changes) -> dict:
        """A valid tiny ``dgrpo train`` config (dGRPO, embedded rollouts, one save per step)
        with top-level ``changes`` merged in."""
        config = {"run_dir": str(run_dir), "seed": 1234, "steps": 4, "save_every": 1,
                  "keep_last": 2, "prompts_per_step": 2, "tokenizer": str(self.tokenizer),
                  "student": {"preset": "tiny-qwen3"}, "teacher": {"preset": "small-qwen3"},
                  "loss": {"objective": "dgrpo"},
                  "sampling": {"n": 2, "max_new_tokens": 4, "temperature": 1.0},
                  "data": {"paths": [str(self.data)], "max_prompt_tokens": 4096},
                  "optim": {"lr": 1e-3}}
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
        return config

    def write_config(self, path: Path, run_dir: Path, **changes) -> Path:
        path.write_text(yaml.safe_dump(self.config(run_dir, **changes)))
        return path


def tree_digest(root: Path) -> dict[str, tuple[int, str]]:
    """``relative path -> (size, sha256)`` of every file under ``root``."""
    digest = {}
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        digest[str(path.relative_to(root))] = (path.stat().st_size,
                                               hashlib.sha256(path.read_bytes()).hexdigest())
    return digest


def checkpoint_contents(root: Path) -> dict[str, str]:
    """``relative path -> sha256`` of what every file under ``root`` holds: for safetensors
    the metadata and each tensor's name, dtype, shape and bytes, in sorted order (the file's
    own header order varies from process to process), for other files their bytes."""
    from safetensors import safe_open

    contents = {}
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as handle:
                digest.update(repr(sorted((handle.metadata() or {}).items())).encode())
                for name in sorted(handle.keys()):
                    tensor = handle.get_tensor(name)
                    digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
                    digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(path.read_bytes())
        contents[str(path.relative_to(root))] = digest.hexdigest()
    return contents


def bytes_lost(before: dict[str, tuple[int, str]], after: dict[str, tuple[int, str]]) -> int:
    """Bytes of the files of ``before`` that are gone or changed in ``after``."""
    return sum(size for name, (size, sha) in before.items() if after.get(name, (0, ""))[1] != sha)


def run_to_end(process, timeout: float = 300) -> int:
    """Wait for a :class:`~megatron_dgrpo.testing.cli_processes.CliLauncher` process; its
    exit code (killed and failed if it outlives ``timeout``)."""
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        pytest.fail(f"process {process.pid} still running after {timeout:.0f} s")
    return process.exitcode


def log_text(path: Path) -> str:
    return Path(path).read_text(errors="replace") if Path(path).exists() else ""
