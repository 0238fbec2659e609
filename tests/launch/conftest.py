"""Launch tests: a real single-node Slurm (session-scoped), the tiny CPU assets, NeMo-Run's env.

The Slurm fixture skips, with the reason, only when Slurm cannot exist here (not root, the
Debian packages missing); once those are present a daemon that fails to start is an error.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_dgrpo.launch.local_slurm import (
    LocalSlurm,
    SlurmUnavailable,
    check_prerequisites,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory):
    try:
        check_prerequisites()
    except SlurmUnavailable as exc:
        pytest.skip(f"no local Slurm: {exc}")
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm"), partition="debug")
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()


@pytest.fixture(scope="session")
def cpu_assets(tmp_path_factory) -> Path:
    """Tokenizer (vocab 1024, the presets' size) and synthetic tasks, made by the dgrpo CLI."""
    root = tmp_path_factory.mktemp("cpu-assets")
    for argv in (["data", "tokenizer", "--out", str(root / "tokenizer"), "--vocab-size", "1024"],
                 ["data", "synth", "--out", str(root / "data"), "--num", "16", "--lengths", "256",
                  "--seed", "0"]):
        subprocess.run([sys.executable, "-m", "megatron_dgrpo.cli", *argv], check=True,
                       capture_output=True, timeout=300)
    return root


@pytest.fixture(scope="session")
def launch_python() -> str:
    """The interpreter of the NeMo-Run environment (tools/install_launch.sh)."""
    python = os.environ.get("DGRPO_LAUNCH_PYTHON", str(REPO / ".venv-launch" / "bin" / "python"))
    if not Path(python).is_file():
        pytest.skip(f"no NeMo-Run environment at {python}: run tools/install_launch.sh "
                    "(or set DGRPO_LAUNCH_PYTHON)")
    return python
