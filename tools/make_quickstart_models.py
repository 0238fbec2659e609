"""Make the two models that ``dgrpo quickstart`` ships: a teacher that reads and a student base.

    .venv/bin/python tools/make_quickstart_models.py --out runs/quickstart-models [--install]

Two CPU cores cannot teach a model to read in the quickstart's 15 minutes, so the quickstart
starts from checkpoints made here, by this package's own ``dgrpo train`` (one config per
phase, written to each run directory), on one CPU thread:

1. ``tokenizer``: the quickstart's ChatML BPE (vocabulary 1024, ``train_tiny_tokenizer``);
2. ``data/copy``: 20,000 copy-curriculum documents of 30 made-up names and their recap
   (``data.synth.copy_curriculum``, about 530 tokens each); ``data/tasks``: 8,000 1-hop
   ``multihop`` and ``counterfactual`` tasks at 512 measured tokens (``dgrpo data synth``);
3. ``copy-lm``: ``small-qwen3`` (4 layers, 1M parameters) language-modelled on the copy
   documents, 1,200 steps at a constant lr 3e-3 (the later phases start from step 1,000): it
   learns to copy (induction) at about step 800;
4. ``task-sft-1``: SFT on the tasks from ``copy-lm`` step 1,000, 300 steps, lr 1e-3 cosine;
5. ``task-sft-2``: the same, 450 steps from ``task-sft-1`` step 300 (a fresh schedule). Its
   step 150 (450 task-SFT steps in all) is the **student base**: it knows the answer format
   and copies names, but it scores the no-context baseline on held-out retrieval;
6. ``task-sft-3``: the same, 450 steps from ``task-sft-2`` step 450. Its last step (1,200
   task-SFT steps) is the **teacher**.

The phases restart their learning-rate schedule because that is how the shipped models were
found, experiment by experiment; they are recorded as they were run, not tidied. ``--install``
copies the two checkpoints, the tokenizer, every phase's ``config.yaml`` and ``metrics.jsonl``
and a manifest (SHA-256 of each weight file) into ``megatron_dgrpo/assets/quickstart``.
About 75 minutes on one core (copy-lm 32 min, each task phase 9-13 min, data 5 min).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from megatron_dgrpo.quickstart import (QUICKSTART_ASSETS, QUICKSTART_TASKS, READER_PRESET,
                                       STUDENT_BASE, TEACHER)

REPO = Path(__file__).resolve().parents[1]

VOCAB_SIZE = 1024
COPY_DOCUMENTS, COPY_NAMES, COPY_SEED = 20_000, 30, 0
TASK_EXAMPLES, TASK_TOKENS, TASK_SEED = 8_000, 512, 0
PROMPTS_PER_STEP = 16


def _sft(lr: float, warmup: int, decay: str) -> dict[str, Any]:
    return {"loss": {"objective": "sft"}, "prompts_per_step": PROMPTS_PER_STEP,
            "optim": {"lr": lr, "warmup_steps": warmup, "decay": decay,
                      **({"min_lr": lr / 10} if decay == "cosine" else {})}}


# name -> (init: (phase, step) or None, data, steps, save_every, extra sections)
PHASES: dict[str, tuple[tuple[str, int] | None, str, int, int, dict[str, Any]]] = {
    "copy-lm": (None, "copy", 1200, 250,
                {**_sft(3e-3, 50, "constant"), "prompt_loss": True,
                 "data": {"answer_instruction": False}}),
    "task-sft-1": (("copy-lm", 1000), "tasks", 300, 100, _sft(1e-3, 20, "cosine")),
    "task-sft-2": (("task-sft-1", 300), "tasks", 450, 150, _sft(1e-3, 20, "cosine")),
    "task-sft-3": (("task-sft-2", 450), "tasks", 450, 150, _sft(1e-3, 20, "cosine")),
}
SHIPPED = {STUDENT_BASE: ("task-sft-2", 150), TEACHER: ("task-sft-3", 450)}


def make_data(out: Path) -> None:
    from megatron_dgrpo.data.synth import SynthConfig
    from megatron_dgrpo.data.synth.copy_curriculum import write_copy_dataset
    from megatron_dgrpo.data.synth.writer import write_synth_dataset
    from megatron_dgrpo.data.tiny_tokenizer import train_tiny_tokenizer

    if not (out / "tokenizer").exists():
        train_tiny_tokenizer(out / "tokenizer", vocab_size=VOCAB_SIZE)
    if not (out / "data" / "copy").exists():
        write_copy_dataset(out / "data" / "copy", COPY_DOCUMENTS, COPY_SEED, COPY_NAMES)
    if not (out / "data" / "tasks").exists():
        write_synth_dataset(SynthConfig(num_examples=TASK_EXAMPLES, seed=TASK_SEED,
                                        lengths=(TASK_TOKENS,), tasks=QUICKSTART_TASKS,
                                        hops=(1,), tokenizer=str(out / "tokenizer"),
                                        filler_bank_size=2000), out / "data" / "tasks")


def phase_config(out: Path, name: str) -> dict[str, Any]:
    """The ``dgrpo train`` config of phase ``name`` (see the module docstring)."""
    from megatron_dgrpo.models.presets import get_preset
    from megatron_dgrpo.recipe import model_dir, run_config

    init, data, steps, save_every, sections = PHASES[name]
    if init is None:
        import dataclasses

        model = dataclasses.asdict(dataclasses.replace(get_preset(READER_PRESET),
                                                       vocab_size=VOCAB_SIZE))
        student = {"preset": None, "model": model}
    else:
        student = {"init_from": str(model_dir(out / "runs" / init[0], init[1]))}  # its config wins
    others = {key: value for key, value in sections.items() if key != "data"}
    config = run_config(out / "runs" / name, out / "tokenizer", out / "data" / data, 1, 0,
                        student=student, steps=steps, save_every=save_every, keep_last=100,
                        **others)
    config["data"] = {**config["data"], "max_prompt_tokens": 4096, **sections.get("data", {})}
    return config


def install(out: Path) -> None:
    """Replace the shipped checkpoints, tokenizer, logs and manifest in the package (its
    README stays) with those of ``out``; everything is copied first, then swapped in."""
    from megatron_dgrpo.recipe import model_dir

    staged = QUICKSTART_ASSETS.parent / ".quickstart.staged"
    if staged.exists():
        shutil.rmtree(staged)
    shutil.copytree(out / "tokenizer", staged / "tokenizer")
    manifest: dict[str, Any] = {"made_by": "tools/make_quickstart_models.py", "models": {}}
    for label, (phase, step) in SHIPPED.items():
        shutil.copytree(model_dir(out / "runs" / phase, step), staged / label)
        weights = sorted((staged / label).rglob("*.safetensors"))
        manifest["models"][label] = {
            "phase": phase, "step": step,
            "sha256": {str(p.relative_to(staged / label)):
                       hashlib.sha256(p.read_bytes()).hexdigest() for p in weights}}
    for phase in PHASES:
        logs = staged / "logs" / phase
        logs.mkdir(parents=True)
        for name in ("config.yaml", "metrics.jsonl"):
            shutil.copy2(out / "runs" / phase / name, logs / name)
    (staged / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    QUICKSTART_ASSETS.mkdir(parents=True, exist_ok=True)
    for entry in sorted(staged.iterdir()):
        target = QUICKSTART_ASSETS / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        entry.replace(target)
    staged.rmdir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="working directory (resumable)")
    parser.add_argument("--install", action="store_true",
                        help=f"copy the results into {QUICKSTART_ASSETS.relative_to(REPO)}")
    args = parser.parse_args(argv)
    from megatron_dgrpo.recipe import model_dir, train_phase

    make_data(args.out)
    for name in PHASES:
        config = phase_config(args.out, name)
        if model_dir(config["run_dir"], config["steps"]).exists():
            print(f"{name}: done already", flush=True)
            continue
        print(f"{name}: {config['steps']} steps", flush=True)
        train_phase(config, tp=1, threads=1)
    if args.install:
        install(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
