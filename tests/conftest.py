"""Shared pytest set-up: quiet Megatron's missing-TE warnings, keep CPU threads modest, and
tiny tokenizers trained locally (HF byte-level BPE with a ChatML template, and sentencepiece)."""

import random
import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")
torch.set_num_threads(2)


CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus(lines: int = 1500) -> list[str]:
    from megatron_dgrpo.data.synth import SynthConfig, SynthGenerator

    generator = SynthGenerator(SynthConfig(lengths=(256,), seed=99, filler_bank_size=200))
    text = " ".join(generator.example(i).document for i in range(16)).split(". ")
    rng = random.Random(0)
    return [rng.choice(text) + "." for _ in range(lines)] + ["0 1 2 3 4 5 6 7 8 9 , ; : ? ! ( ) # '"]


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab 400) with a Qwen-style ChatML chat template, saved to disk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    wrapped.chat_template = CHATML_TEMPLATE
    path = tmp_path_factory.mktemp("hf_tokenizer")
    wrapped.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory) -> Path:
    """A sentencepiece BPE model (vocab 512) like modern LLM ones: byte fallback, identity normalization
    (newlines survive), no dummy prefix, and the ChatML markers as user-defined symbols."""
    import sentencepiece

    prefix = tmp_path_factory.mktemp("sp_tokenizer") / "tiny"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
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
