"""Shared pytest set-up: quiet Megatron's missing-TE warnings, keep CPU threads modest, and
tiny tokenizers trained locally (HF byte-level BPE with a ChatML template, and sentencepiece)."""

import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab 400) with a Qwen-style ChatML chat template, saved to disk."""
    from megatron_dgrpo.data.tiny_tokenizer import train_tiny_tokenizer

    return train_tiny_tokenizer(tmp_path_factory.mktemp("hf") / "tokenizer", vocab_size=400)


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory) -> Path:
    """A sentencepiece BPE model (vocab 512) like modern LLM ones: byte fallback, identity normalization
    (newlines survive), no dummy prefix, and the ChatML markers as user-defined symbols."""
    import sentencepiece

    from megatron_dgrpo.data.tiny_tokenizer import training_corpus

    prefix = tmp_path_factory.mktemp("sp_tokenizer") / "tiny"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(training_corpus()),
        model_prefix=str(prefix),
        vocab_size=512,
        model_type="bpe",
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        byte_fallback=True,
        minloglevel=2,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
    )
    return prefix.with_suffix(".model")
