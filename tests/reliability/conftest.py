"""Shared set-up of the reliability suite, and its figures.

Every test here counts what it tried and what held (:class:`Ledger`): tests marked
``reliability_case(kind)`` count one case of ``kind`` each (held = passed); tests with many
cases inside (a lineage of kills) count them through the ``ledger`` fixture. The session ends
by printing one line: faults injected / survived, bad inputs tried / rejected with a clear
message, bytes of earlier results lost, prompt-injection cases / neutralised.

``launcher`` starts ``dgrpo`` commands as real processes forked from a pre-imported server
(:mod:`megatron_dgrpo.testing.cli_processes`); ``synth_assets`` is a tokenizer and 8
synthetic 256-token tasks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from reliability_helpers import SynthAssets

KINDS = {"fault": ("faults injected", "survived"),
         "bad_input": ("bad inputs tried", "rejected with a clear message"),
         "injection": ("prompt-injection cases", "neutralised")}


@dataclasses.dataclass
class Ledger:
    tried: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    held: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    bytes_lost: int = 0

    def count(self, kind: str, held: bool, cases: int = 1) -> None:
        self.tried[kind] += cases
        self.held[kind] += cases if held else 0

    def summary(self) -> str:
        parts = [f"{tried} {self.tried[k]} / {held} {self.held[k]}"
                 for k, (tried, held) in KINDS.items()]
        parts.insert(2, f"bytes of earlier results lost {self.bytes_lost}")
        return "reliability: " + "; ".join(parts)


LEDGER = Ledger()


def pytest_configure(config):
    config.addinivalue_line("markers", "reliability_case(kind): one case of the reliability "
                                       "figures (fault, bad_input, injection); held = passed")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    marker = item.get_closest_marker("reliability_case")
    if marker is not None and report.when == "call":
        LEDGER.count(marker.args[0], report.passed)
    return report


def pytest_terminal_summary(terminalreporter):
    if any(LEDGER.tried.values()):
        terminalreporter.write_line(LEDGER.summary())


@pytest.fixture
def ledger() -> Ledger:
    return LEDGER


@pytest.fixture(scope="session")
def launcher():
    from megatron_dgrpo.testing.cli_processes import CliLauncher

    return CliLauncher()


@pytest.fixture(scope="session")
def synth_assets(tmp_path_factory, hf_tokenizer_dir) -> SynthAssets:
    from megatron_dgrpo.cli import main

    root = tmp_path_factory.mktemp("reliability-assets")
    assert main(["data", "synth", "--out", str(root / "data"), "--num", "8", "--lengths", "256",
                 "--seed", "3"]) == 0
    return SynthAssets(root, Path(hf_tokenizer_dir), root / "data")
