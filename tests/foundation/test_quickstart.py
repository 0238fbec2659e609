"""The README's first command: `dgrpo quickstart` end to end, and its refusal to overwrite."""

import json

import pytest

from megatron_dgrpo.cli import main

pytestmark = pytest.mark.multiproc


def test_quickstart_round_trip_parity_and_report(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out)]) == 0
    report = json.loads((out / "quickstart.json").read_text())
    assert report["ok"] is True
    assert report["round_trip"]["differing"] == [] and report["round_trip"]["tensors"] > 0
    assert report["logits_max_abs_diff"] < 1e-4
    assert report["greedy_equal"] is True
    assert (out / "quickstart.md").read_text().startswith("# dgrpo quickstart")

    # A second run into the same directory is refused, and the first run's files survive.
    before = sorted(p.name for p in out.iterdir())
    assert main(["quickstart", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
