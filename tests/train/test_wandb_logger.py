"""The optional W&B sink of MetricsLogger, in W&B's offline mode (no network): the offline run's
record file is parsed back (its framing: a 7-byte ``:W&B`` header, then LevelDB-log chunks of
protobuf ``Record`` messages in 32 KiB blocks) and must hold exactly the scalars logged to
``metrics.jsonl``, under the same names, and the evaluation table."""

import json
import re
import struct
import sys

import pytest

from megatron_dgrpo.config import from_dict
from megatron_dgrpo.train.metrics import MetricsLogger, read_metrics
from megatron_dgrpo.train.wandb_logger import LoggingConfig, WandbConfig

BLOCK = 32768


def _records(path):
    """Protobuf payloads of a W&B transaction log (FULL=1, FIRST=2, MIDDLE=3, LAST=4 chunks)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if BLOCK - position % BLOCK < 7:  # block tail too short for a header: padding
            position += BLOCK - position % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            yield pending
            pending = b""


@pytest.fixture
def offline(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "cfg",
                        "WANDB_CACHE_DIR": tmp_path / "cache", "WANDB_DATA_DIR": tmp_path / "data"}.items():
        monkeypatch.setenv(name, str(value))


def _history(run_dir):
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    steps = {}
    for payload in _records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            steps[items.pop("_step")] = {k: v for k, v in items.items() if not k.startswith("_")}
    return steps


def test_offline_run_holds_the_same_metric_names_and_the_table(offline, tmp_path):
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, tensorboard=False, wandb=WandbConfig(project="dgrpo-test", mode="offline"),
                       run_config={"steps": 2}) as logger:
        logger.log(1, {"reward/mean": 0.25, "policy/kl_teacher": 0.125, "time/rollout_s": 3.0})
        logger.log(2, {"reward/mean": 0.5, "policy/kl_teacher": float("nan"), "time/rollout_s": 2.0})
        logger.log_table(2, "eval/scores", ["family", "length", "score"], [["multihop", "4k", 50.0], ["all", "all", 40.0]])
    jsonl = {r["step"]: {k: v for k, v in r.items() if k not in ("step", "time")} for r in read_metrics(run_dir)}
    history = _history(run_dir)
    assert history[1] == jsonl[1] == {"reward/mean": 0.25, "policy/kl_teacher": 0.125, "time/rollout_s": 3.0}
    table_keys = {k for k in history[2] if k.startswith("eval/scores/")}
    assert {k: v for k, v in history[2].items() if k not in table_keys} == {"reward/mean": 0.5, "time/rollout_s": 2.0}
    assert jsonl[2]["policy/kl_teacher"] is None  # non-finite: null in JSONL, left out of W&B
    assert history[2]["eval/scores/_type"] == "table-file"
    (table_file,) = run_dir.glob("wandb/offline-run-*/files/media/table/eval/scores_2_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["family", "length", "score"]
    assert table["data"] == [["multihop", "4k", 50.0], ["all", "all", 40.0]]


def test_resumed_run_continues_the_same_wandb_run(offline, tmp_path):
    run_dir = tmp_path / "run"
    config = WandbConfig(project="dgrpo-test", mode="offline")
    with MetricsLogger(run_dir, tensorboard=False, wandb=config) as logger:
        logger.log(1, {"loss": 1.0})
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    with MetricsLogger(run_dir, resume_step=1, tensorboard=False, wandb=config) as logger:
        logger.log(2, {"loss": 0.5})
    ids = {re.fullmatch(r"offline-run-\d{8}_\d{6}-([a-z0-9]+)(-\d+)?", p.name).group(1)
           for p in run_dir.glob("wandb/offline-run-*")}
    assert ids == {run_id}


def test_logging_section_and_missing_package(monkeypatch, tmp_path):
    assert from_dict(LoggingConfig, {"wandb": {"project": "p", "entity": "team", "mode": "offline"}}).wandb.entity == "team"
    assert from_dict(LoggingConfig, {}).wandb is None
    with pytest.raises(ValueError, match="logging.wandb.project"):
        from_dict(LoggingConfig, {"wandb": {"mode": "offline"}})
    with pytest.raises(ValueError):
        from_dict(LoggingConfig, {"wandb": {"project": "p", "team": "x"}})
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if the package were not installed
    with pytest.raises(ImportError, match=r"pip install 'megatron-dgrpo\[wandb\]'"):
        MetricsLogger(tmp_path / "run", tensorboard=False, wandb=WandbConfig(project="p"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
