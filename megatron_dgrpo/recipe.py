"""Phases that the CPU commands (``dgrpo quickstart``, ``dgrpo experiment``) compose from the
package's ordinary commands: data assets, a training phase on local ranks, and greedy
evaluation of checkpoints on held-out sets beside the no-context baseline.

Every training phase is a ``dgrpo train`` run with a generated config (written to its run
directory as ``config.yaml``, so it can be re-run by hand), every evaluation the same path as
``dgrpo eval``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


def model_dir(run_dir: str | Path, step: int) -> Path:
    """The Megatron checkpoint of ``run_dir``'s training checkpoint at ``step``."""
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}" / "model"


def run_config(run_dir: Path, tokenizer: Path, train_data: Path, tp: int, seed: int,
               **sections: Any) -> dict[str, Any]:
    """A ``dgrpo train`` config (as a dict) for one phase; ``sections`` override or add."""
    return {"run_dir": str(run_dir), "seed": seed, "tokenizer": str(tokenizer),
            "parallel": {"tensor_parallel": tp}, "keep_last": 1_000,
            "data": {"paths": [str(train_data)]}, **sections}


def _train(rank: int, world_size: int, config: dict[str, Any], threads: int) -> int:
    """One ``dgrpo train`` run on this rank (spawned by :func:`train_phase`)."""
    import torch

    from megatron_dgrpo.config import from_dict
    from megatron_dgrpo.train.config import RunConfig
    from megatron_dgrpo.train.runner import run_training

    torch.set_num_threads(max(1, threads // world_size))
    run = from_dict(RunConfig, config)
    run.validate()
    return run_training(run, show_progress=rank == 0 and threads > 1)


def train_phase(config: dict[str, Any], tp: int = 1, threads: int = 2) -> None:
    """Train one phase on ``tp`` spawned ranks (``threads`` CPU threads in all), then render
    its curves (``dgrpo report``)."""
    from megatron_dgrpo.parallel.launch import run_distributed
    from megatron_dgrpo.report import write_report

    codes = run_distributed(_train, tp, args=(config, threads), timeout_s=4 * 3600)
    if any(codes):
        raise RuntimeError(f"training in {config['run_dir']} stopped early (exit codes {codes})")
    write_report(config["run_dir"])


@dataclass(frozen=True)
class HeldOut:
    """A held-out set to evaluate on: parquet files, the training data its no-context
    baseline is fitted on, and the generation budget."""

    name: str
    data: str
    baseline_data: str
    max_new_tokens: int


def evaluate_models(rank: int, world_size: int, models: list[tuple[str, str]],
                    tokenizer_dir: str, sets: list[HeldOut], eval_root: str,
                    threads: int = 2) -> dict[str, dict[str, dict[str, Any]]]:
    """Greedy answers of each ``(label, checkpoint)`` on each held-out set, as ``dgrpo eval``
    gives them (run in one spawned process). Returns ``{label: {set: scores}}`` where scores
    holds ``families`` (family -> score), ``all``, ``baseline`` (family -> no-context
    baseline score, and ``all``) and ``depths`` (family -> depth -> score)."""
    import torch

    from megatron_dgrpo.data.baseline import NoContextBaseline, read_fit_rows
    from megatron_dgrpo.data.chat import IM_END, load_chat_tokenizer, reply_text
    from megatron_dgrpo.data.evaluate import ALL, evaluate
    from megatron_dgrpo.data.longblocks import LongBlocksConfig, LongBlocksLoader
    from megatron_dgrpo.models.config import ParallelConfig
    from megatron_dgrpo.models.loading import checkpoint_model
    from megatron_dgrpo.models.provider import destroy_parallel, initialize_parallel
    from megatron_dgrpo.rollout.embedded import EmbeddedEngine
    from megatron_dgrpo.rollout.engine import SamplingParams

    torch.set_num_threads(threads)
    tokenizer = load_chat_tokenizer(tokenizer_dir)
    baselines = {s.name: NoContextBaseline.fit(read_fit_rows([s.baseline_data]),
                                               fit_on=s.baseline_data) for s in sets}
    initialize_parallel(ParallelConfig())
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    for label, checkpoint in models:
        model, config = checkpoint_model(checkpoint, ParallelConfig(), tokenizer)
        engine = EmbeddedEngine(model, config.vocab_size, decode=tokenizer.decode)
        scores[label] = {}
        for held_out in sets:
            params = SamplingParams(temperature=0.0, max_new_tokens=held_out.max_new_tokens,
                                    stop_strings=[IM_END])

            def generate(prompts: list[list[int]], params=params) -> list[str]:
                return [reply_text(r.text) for r in engine.generate(prompts, params).rollouts]

            loader = LongBlocksLoader(LongBlocksConfig(paths=(held_out.data,), split="all"),
                                      tokenizer)
            table = evaluate(loader, generate, out_dir=Path(eval_root) / label / held_out.name,
                             batch_size=32, baseline=baselines[held_out.name])
            families = [*table.families, ALL]
            scores[label][held_out.name] = {
                "families": {f: table.score(f) for f in table.families},
                "all": table.score(ALL),
                "baseline": {f: table.baseline.table.score(f) for f in families},
                "depths": {f: {d: table.score(f, depth=d) for d in table.depths}
                           for f in families},
            }
    destroy_parallel()
    return scores
