"""One way to get a live model (and check its tokenizer): trainer, teacher cache, eval, quickstart.

    model = build_model(config, parallel, init_from="ckpt/student")   # random if init_from is None
    model, config = checkpoint_model("ckpt/teacher", parallel, tokenizer)

Call after :func:`~megatron_dgrpo.models.provider.initialize_parallel`, on every rank.
"""

from __future__ import annotations

import os

import torch

from megatron_dgrpo.models.config import ModelConfig, ParallelConfig


def require_tokenizer_fits(tokenizer, config: ModelConfig, model_name: str) -> None:
    """ValueError unless every id ``tokenizer`` produces has a row in the model's vocabulary
    (``tokenizer``: anything with ``vocab_size`` and, optionally, ``name``)."""
    if tokenizer.vocab_size > config.vocab_size:
        name = getattr(tokenizer, "name", "the tokenizer")
        raise ValueError(f"tokenizer {name} has {tokenizer.vocab_size} tokens, but {model_name}'s "
                         f"vocabulary only {config.vocab_size}: they do not belong together")


def build_model(config: ModelConfig, parallel: ParallelConfig,
                init_from: str | os.PathLike | None = None) -> torch.nn.Module:
    """This rank's ``GPTModel`` of ``config`` (with virtual pipeline stages: its
    :class:`~megatron_dgrpo.models.chunks.VirtualStages`), with the weights of the Megatron
    checkpoint ``init_from`` (any TP/PP layout) or Megatron's seeded random initialisation."""
    from megatron_dgrpo.models.convert import load_megatron_checkpoint_into
    from megatron_dgrpo.models.provider import build_stage_model

    model = build_stage_model(config, parallel)
    if init_from is not None:
        load_megatron_checkpoint_into(model, init_from)
    return model


def checkpoint_model(checkpoint: str | os.PathLike, parallel: ParallelConfig,
                     tokenizer=None) -> tuple[torch.nn.Module, ModelConfig]:
    """The model stored in the Megatron checkpoint ``checkpoint`` and its config, after
    checking that ``tokenizer`` (if given) fits its vocabulary."""
    from megatron_dgrpo.models.convert import MegatronCheckpoint

    config = MegatronCheckpoint(checkpoint).config
    if tokenizer is not None:
        require_tokenizer_fits(tokenizer, config, str(checkpoint))
    return build_model(config, parallel, checkpoint), config
