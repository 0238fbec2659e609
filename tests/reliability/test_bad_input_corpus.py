"""Bad input, through the ``dgrpo`` command as a user runs it: a corpus of cases, each with the
message it must get. Every case runs as its own ``dgrpo`` process (forked from the
pre-imported server, :mod:`megatron_dgrpo.testing.cli_processes`; two of them also as a
plain ``python -m megatron_dgrpo.cli`` process, to show the two agree) and must exit 2 with
``dgrpo COMMAND: error: MESSAGE`` on stderr and no traceback, and leave every byte that was
there before as it was: an earlier run's results, the data, the tokenizer, the checkpoints
and the case's own (broken) inputs are checksummed before and after, and nothing may be
added to them either.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from reliability_helpers import bytes_lost, log_text, run_to_end, tree_digest

pytestmark = pytest.mark.reliability


@dataclasses.dataclass
class World:
    """What the cases may break or point at, and must leave as it was."""

    root: Path
    assets: object  # reliability_helpers.SynthAssets
    earlier_run: Path  # a finished run: results that must survive every case
    tiny_hf: Path  # a random tiny-qwen3 as Hugging Face and Megatron checkpoints
    tiny_ckpt: Path
    small_ckpt: Path  # small-qwen3 (another shape)
    vocab512_ckpt: Path  # small-qwen3 with another vocabulary (another tokenizer's model)

    def protected(self) -> list[Path]:
        return [self.earlier_run, self.assets.data, self.assets.tokenizer, self.tiny_hf,
                self.tiny_ckpt, self.small_ckpt, self.vocab512_ckpt]


@pytest.fixture(scope="module")
def world(launcher, synth_assets, tmp_path_factory) -> World:
    from megatron_dgrpo.models.presets import get_preset
    from megatron_dgrpo.testing.tiny_models import write_random_qwen3

    root = tmp_path_factory.mktemp("bad-input-world")
    earlier = root / "results" / "earlier-run"
    config = synth_assets.write_config(root / "earlier.yaml", earlier, steps=1,
                                       loss={"objective": "sft"}, teacher=None)
    process = launcher.start(["train", "--config", str(config), "--no-progress"],
                             root / "earlier.log")
    assert run_to_end(process) == 0, log_text(root / "earlier.log")[-3000:]
    small = get_preset("small-qwen3")
    write_random_qwen3(get_preset("tiny-qwen3"), root / "tiny-hf", root / "tiny-ckpt")
    write_random_qwen3(small, root / "small-hf", root / "small-ckpt")
    write_random_qwen3(dataclasses.replace(small, vocab_size=512), root / "v512-hf",
                       root / "v512-ckpt")
    return World(root, synth_assets, earlier, root / "tiny-hf", root / "tiny-ckpt",
                 root / "small-ckpt", root / "v512-ckpt")


# ------------------------------------------------------------------ how cases are built

SFT = {"loss": {"objective": "sft"}, "teacher": None, "steps": 1}


def train(w: World, case: Path, text: str | None = None, overrides=(), **changes) -> list[str]:
    """``dgrpo train`` of a valid one-step SFT run into ``case/run`` with ``changes`` (or of
    the config file ``text``) and ``overrides``."""
    config = case / "run.yaml"
    if text is None:
        tree = w.assets.config(changes.pop("run_dir", case / "run"), **{**SFT, **changes})
        config.write_text(yaml.safe_dump(tree))
    else:
        config.write_text(text)
    return ["train", "--config", str(config), "--no-progress", *overrides]


def yaml_text(w: World, case: Path, tail: str) -> str:
    """The valid config's YAML with ``tail`` appended."""
    return yaml.safe_dump(w.assets.config(case / "run", **SFT)) + tail


def copied_checkpoint(w: World, case: Path) -> Path:
    ckpt = case / "ckpt"
    shutil.copytree(w.tiny_ckpt, ckpt)
    return ckpt


def shard(ckpt: Path) -> Path:
    return ckpt / "mp_rank_00_000" / "model.safetensors"


def parquet(case: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    data = case / "data"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), data / "part-0.parquet")
    return data


def synth_rows(w: World) -> list[dict]:
    return pq.read_table(next(w.assets.data.glob("*.parquet"))).to_pylist()


def resumable_copy(w: World, case: Path) -> Path:
    """A copy of the earlier run (its config, to resume it)."""
    run = case / "run"
    shutil.copytree(w.earlier_run, run)
    return run


# ------------------------------------------------------------------ the corpus

Case = tuple[str, Callable[[World, Path], list[str]], str]


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"#" * 32  # inside the JSON header
    path.write_bytes(bytes(data))


def init_from_damaged(damage: Callable[[World, Path], None]):
    """A case training from a copy of the tiny checkpoint that ``damage(world, copy)`` broke."""
    def make(w: World, case: Path) -> list[str]:
        ckpt = copied_checkpoint(w, case)
        damage(w, ckpt)
        return train(w, case, student={"init_from": str(ckpt)})
    return make


def _resume_truncated(w: World, case: Path, kind: str) -> list[str]:
    run = resumable_copy(w, case)
    _truncate(run / "checkpoints" / "step_00000001" / kind / "rank_00000.safetensors")
    config = yaml.safe_load((run / "config.yaml").read_text())
    return train(w, case, text=yaml.safe_dump({**config, "run_dir": str(run)}))


def _hf_with(w: World, case: Path, damage) -> list[str]:
    hf = case / "hf"
    shutil.copytree(w.tiny_hf, hf)
    damage(hf / "model.safetensors")
    return ["convert", "hf-to-megatron", "--hf", str(hf), "--out", str(case / "out")]


def _data_with(w: World, case: Path, rows, schema=None) -> list[str]:
    return train(w, case, data={"paths": [str(parquet(case, rows, schema))]})


def _not_parquet(w: World, case: Path) -> list[str]:
    data = case / "data"
    data.mkdir()
    (data / "part-0.parquet").write_text("document,question,answer\nnot,a,parquet\n")
    return train(w, case, data={"paths": [str(data)]})


def _empty_dir(w: World, case: Path) -> list[str]:
    (case / "data").mkdir()
    return train(w, case, data={"paths": [str(case / "data")]})


def _other_run(w: World, case: Path) -> list[str]:
    return train(w, case, run_dir=str(w.earlier_run), loss={"objective": "kd"},
                 teacher={"preset": "small-qwen3"})


def _occupied_out(w: World, case: Path) -> list[str]:
    (case / "out").mkdir()
    (case / "out" / "notes.txt").write_text("mine\n")
    return ["convert", "hf-to-megatron", "--hf", str(w.tiny_hf), "--out", str(case / "out")]


CASES: list[Case] = [
    # malformed YAML, keys, types
    ("yaml-unclosed-bracket", lambda w, d: train(w, d, text=yaml_text(w, d, "extra: [1, 2\n")),
     r"run\.yaml is not valid YAML: .*line \d+"),
    ("yaml-bad-indentation", lambda w, d: train(w, d, text="steps: 3\n  seed: 4\n"),
     r"run\.yaml is not valid YAML: mapping values are not allowed here.*line 2"),
    ("yaml-tab-indentation", lambda w, d: train(w, d, text="optim:\n\tlr: 0.1\n"),
     r"run\.yaml is not valid YAML: .*found character '\\t' that cannot start any token at "
     r"line 2, column 1"),
    ("yaml-top-level-list", lambda w, d: train(w, d, text="- steps: 3\n"),
     r"the top level must be a mapping, got list"),
    ("misspelled-top-level-key", lambda w, d: train(w, d, stpes=3),
     r"unknown config key\(s\) stpes \(stpes: did you mean steps\?\)"),
    ("misspelled-nested-key", lambda w, d: train(w, d, loss={"objective": "sft", "kl_cof": 0.1}),
     r"unknown config key\(s\) loss\.kl_cof \(loss\.kl_cof: did you mean loss\.kl_coef\?\)"),
    ("misspelled-override", lambda w, d: train(w, d, overrides=["optim.weight_decy=0.1"]),
     r"optim\.weight_decy: did you mean optim\.weight_decay\?"),
    ("unknown-section", lambda w, d: train(w, d, trainer={"steps": 3}),
     r"unknown config key\(s\) trainer; known keys of RunConfig"),
    ("string-for-integer", lambda w, d: train(w, d, steps="ten"),
     r"steps: expected an integer, got 'ten'"),
    ("string-for-number", lambda w, d: train(w, d, optim={"lr": "fast"}),
     r"optim\.lr: expected a number, got 'fast'"),
    ("number-for-list", lambda w, d: train(w, d, data={"paths": 5}),
     r"data\.paths: expected a list, got 5"),
    ("word-for-boolean", lambda w, d: train(w, d, overrides=["data.allow_unusable=maybe"]),
     r"data\.allow_unusable: expected true/false, got 'maybe'"),
    ("unknown-objective", lambda w, d: train(w, d, loss={"objective": "ppo"}),
     r"unknown objective 'ppo'; choose one of \['dgrpo', 'grpo', 'kd', 'opd', 'sft'\]"),
    ("override-without-value", lambda w, d: train(w, d, overrides=["steps"]),
     r"override 'steps' is not of the form key=value"),
    ("zero-steps", lambda w, d: train(w, d, steps=0), r"steps must be >= 1, got 0"),
    ("negative-timeout", lambda w, d: train(w, d, parallel={"timeout_s": -1}),
     r"parallel\.timeout_s must be > 0"),
    # impossible parallel layouts
    ("heads-not-divisible-by-tp", lambda w, d: train(w, d, parallel={"tensor_parallel": 3}),
     r"divisible"),
    ("tp-larger-than-the-world", lambda w, d: train(w, d, parallel={"tensor_parallel": 2}),
     r"world size 1 is not a multiple of TP x PP x CP = 2"),
    ("async-rollouts-without-a-vllm-engine",
     lambda w, d: train(w, d, rollout={"async_mode": "one_step"}),
     r"rollout.async_mode=one_step samples the next batch in a vLLM engine"),
    ("sequence-parallel-without-tp",
     lambda w, d: train(w, d, parallel={"sequence_parallel": True}),
     r"sequence_parallel needs tensor_parallel > 1"),
    ("context-parallel-ring-on-cpu", lambda w, d: train(w, d, parallel={"context_parallel": 2}),
     r"context parallelism with cp_comm_type=p2p needs Transformer Engine on CUDA"),
    # teacher / student vocabularies and tokenizers
    ("teacher-vocabulary-differs",
     lambda w, d: train(w, d, loss={"objective": "kd"},
                        teacher={"preset": None, "model": {"vocab_size": 2048}}),
     r"teacher vocabulary \(2048\) differs from the student's \(1024\)"),
    ("teacher-checkpoint-of-another-tokenizer",
     lambda w, d: train(w, d, loss={"objective": "kd"},
                        teacher={"preset": None, "init_from": str(w.vocab512_ckpt)}),
     r"teacher vocabulary \(512\) differs from the student's \(1024\)"),
    ("tokenizer-larger-than-the-vocabulary",
     lambda w, d: train(w, d, student={"preset": None, "model": {"vocab_size": 256}}),
     r"has 400 tokens, but the student's vocabulary only 256"),
    ("tokenizer-path-missing", lambda w, d: train(w, d, tokenizer=str(d / "no-tokenizer")),
     r"no-tokenizer"),
    # checkpoints
    ("init-from-missing", lambda w, d: train(w, d, student={"init_from": str(d / "nothing")}),
     r"nothing is not a megatron-dgrpo checkpoint \(no dgrpo_checkpoint\.json\)"),
    ("checkpoint-shard-missing", init_from_damaged(lambda w, c: shard(c).unlink()),
     r"checkpoint shard .*mp_rank_00_000/model\.safetensors is missing"),
    ("checkpoint-shard-truncated", init_from_damaged(lambda w, c: _truncate(shard(c))),
     r"model\.safetensors is truncated or corrupted"),
    ("checkpoint-shard-garbled", init_from_damaged(lambda w, c: _corrupt_header(shard(c))),
     r"model\.safetensors is truncated or corrupted"),
    ("checkpoint-metadata-truncated",
     init_from_damaged(lambda w, c: _truncate(c / "dgrpo_checkpoint.json")),
     r"dgrpo_checkpoint\.json is not valid JSON"),
    ("checkpoint-shards-of-another-shape",  # another model's tensors under the same names
     init_from_damaged(lambda w, c: shutil.copy(shard(w.small_ckpt), shard(c))),
     r"model has shape \(1024, 64\), checkpoint gives \(1024, 128\)"),
    ("resume-optimizer-truncated", lambda w, d: _resume_truncated(w, d, "optimizer"),
     r"step_00000001/optimizer/rank_00000\.safetensors is truncated or corrupted"),
    ("resume-rng-truncated", lambda w, d: _resume_truncated(w, d, "rng"),
     r"step_00000001/rng/rank_00000\.safetensors is truncated or corrupted"),
    ("hf-safetensors-truncated", lambda w, d: _hf_with(w, d, _truncate),
     r"model\.safetensors is truncated or corrupted"),
    ("hf-safetensors-garbled", lambda w, d: _hf_with(w, d, _corrupt_header),
     r"model\.safetensors is truncated or corrupted"),
    # data
    ("data-path-missing", lambda w, d: train(w, d, data={"paths": [str(d / "nowhere")]}),
     r"data path '.*nowhere' does not exist"),
    ("data-directory-without-parquet", _empty_dir,
     r"nothing to train on: .*data hold no parquet files"),
    ("parquet-empty", lambda w, d: _data_with(w, d, [], pa.schema(
        [(c, pa.string()) for c in ("id", "document", "question", "answer")])),
     r"nothing to train on: .*data hold no rows"),
    ("parquet-without-question-and-answer",
     lambda w, d: _data_with(w, d, [{k: v for k, v in row.items() if k not in ("question",
                                                                             "answer")}
                                    for row in synth_rows(w)]),
     r"refusing to train on .*100\.0% of the rows are unusable.*missing question: 8 rows"),
    ("parquet-with-wrong-column-types",
     lambda w, d: _data_with(w, d, [{**row, "document": 7, "answer": 1.5}
                                    for row in synth_rows(w)]),
     r"100\.0% of the rows are unusable.*wrong_type document: 8 rows"),
    ("not-a-parquet-file", _not_parquet, r"1 data files cannot be read"),
    ("prompts-longer-than-the-budget",
     lambda w, d: train(w, d, data={"paths": [str(w.assets.data)], "max_prompt_tokens": 64}),
     r"the training data has no usable rows .*over_length"),
    # output directories
    ("run-dir-of-another-run", _other_run,
     r"holds another run: its config\.yaml differs in loss\.objective \('sft' there, 'kd' here\)"),
    ("run-dir-not-a-run", lambda w, d: train(w, d, run_dir=str(w.assets.data)),
     r"is not empty and holds no run \(no config\.yaml\)"),
    ("run-dir-is-a-file",
     lambda w, d: train(w, d, run_dir=str(next(w.assets.data.glob("*.parquet")))),
     r"run_dir .*\.parquet is a file, not a directory"),
    ("convert-into-an-occupied-directory", _occupied_out,
     r"output directory .*out already exists and is not empty"),
    ("config-file-missing", lambda w, d: ["train", "--config", str(d / "missing.yaml")],
     r"No such file or directory: .*missing\.yaml"),
]


def _digests(w: World, case: Path) -> dict[str, dict]:
    return {str(p): tree_digest(p) for p in [*w.protected(), case]}


@pytest.mark.reliability_case("bad_input")
@pytest.mark.parametrize("name, make, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_message_and_changes_nothing(world, launcher, tmp_path, ledger,
                                                            name, make, message):
    case = tmp_path / "case"
    case.mkdir()
    argv = make(world, case)
    before = _digests(world, case)
    log = tmp_path / "dgrpo.log"
    code = run_to_end(launcher.start(argv, log), timeout=300)
    after = _digests(world, case)
    lost = sum(bytes_lost(before[k], after[k]) for k in before)
    ledger.bytes_lost += lost
    output = log_text(log)
    assert lost == 0 and after == before, "files were changed, removed or added"
    assert "Traceback" not in output, output[-3000:]
    assert code == 2, output[-3000:]
    error = [line for line in output.splitlines() if line.startswith(f"dgrpo {argv[0]}: error: ")]
    assert error, output[-3000:]
    assert re.search(message, error[-1]), error[-1]


def test_the_console_command_answers_as_the_forked_one(world, tmp_path):
    """Two cases through a plain ``python -m megatron_dgrpo.cli`` process (what the ``dgrpo``
    script runs): same exit code, same message."""
    for name, make, message in (CASES[4], CASES[-3]):
        case = tmp_path / name
        case.mkdir()
        result = subprocess.run([sys.executable, "-m", "megatron_dgrpo.cli", *make(world, case)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr[-3000:]
        assert re.search(message, result.stderr.strip().splitlines()[-1])
        assert "Traceback" not in result.stderr


def test_a_fresh_run_may_start_beside_the_slurm_scripts_job_records(tmp_path):
    """``slurm/*.sbatch`` write ``RUN_DIR/slurm/JOB-rN/`` before the trainer starts: that
    directory is a fresh run's, anything else in it is not."""
    from megatron_dgrpo.train.config import RunConfig
    from megatron_dgrpo.train.run_dir import check_run_dir

    run_dir = tmp_path / "run"
    (run_dir / "slurm" / "42-r0").mkdir(parents=True)
    (run_dir / "slurm" / "42-r0" / "env.txt").write_text("SLURM_JOB_ID=42\n")
    check_run_dir(RunConfig(run_dir=str(run_dir)))
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and holds no run"):
        check_run_dir(RunConfig(run_dir=str(run_dir)))
