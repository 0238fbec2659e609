"""``dgrpo eval``: score a Megatron checkpoint on LongBlocks-schema data with the embedded engine.

    dgrpo eval --checkpoint CKPT --data DIR --tokenizer TOK --report-dir OUT
               [--max-new-tokens 64] [--temperature 0] [--limit N] [--batch-size 16]

Runs in one process (TP=1) on the machine's default device; writes the RULER-style tables
(``scores.md``, ``scores.json``) and ``heatmap.png`` of :mod:`megatron_dgrpo.data.evaluate`.
Prompts are chat-formatted by the data loader; generation stops at the end-of-turn marker.
"""

from __future__ import annotations

import argparse

from megatron_dgrpo.data.chat import IM_END, reply_text
from megatron_dgrpo.data.cli import add_eval_data_arguments, evaluate_from_args
from megatron_dgrpo.parallel.launch import ensure_process_group_env


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="Megatron checkpoint directory")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    add_eval_data_arguments(parser)


def run_eval(args: argparse.Namespace) -> int:
    from megatron_dgrpo.data.chat import load_chat_tokenizer
    from megatron_dgrpo.models.config import ParallelConfig
    from megatron_dgrpo.models.loading import checkpoint_model
    from megatron_dgrpo.models.provider import initialize_parallel
    from megatron_dgrpo.rollout.embedded import EmbeddedEngine
    from megatron_dgrpo.rollout.engine import SamplingParams

    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                            stop_strings=[IM_END])
    params.validate()
    tokenizer = load_chat_tokenizer(args.tokenizer)
    if ensure_process_group_env() != 1:
        raise ValueError("dgrpo eval runs in one process (TP=1); launch it without torchrun")
    initialize_parallel(ParallelConfig())
    model, config = checkpoint_model(args.checkpoint, ParallelConfig(), tokenizer)
    engine = EmbeddedEngine(model, config.vocab_size, decode=tokenizer.decode)

    def generate(prompts: list[list[int]]) -> list[str]:
        batch = engine.generate(prompts, params)
        return [reply_text(r.text) for r in batch.rollouts]

    evaluate_from_args(args, generate)
    return 0
