"""A small byte-level BPE tokenizer trained offline on the generator's own text.

For CPU runs, tests and the quickstart, where no real tokenizer can be downloaded. It has a
Qwen-style ChatML chat template and the Qwen special tokens (``<|endoftext|>``,
``<|im_start|>``, ``<|im_end|>``; end of turn = ``<|im_end|>``), so the rest of the pipeline
treats it like a Qwen3 tokenizer. Byte-level: every string round-trips.

    dgrpo data tokenizer --out tok/ --vocab-size 1024
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from megatron_dgrpo.outputs import atomic_output_dir, refuse_existing

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def training_corpus(lines: int = 1500, seed: int = 99, documents: int = 16) -> list[str]:
    """Sentences from ``documents`` generated documents, the generator's questions with their
    answers (so frequent answers such as ``unanswerable`` become single tokens, as a real
    tokenizer would have them), plus digits and punctuation."""
    from megatron_dgrpo.data.synth import SynthConfig, SynthGenerator

    generator = SynthGenerator(SynthConfig(lengths=(256,), seed=seed, filler_bank_size=200))
    examples = [generator.example(i) for i in range(max(documents, lines // 5))]
    sentences = " ".join(e.document for e in examples[:documents]).split(". ")
    rng = random.Random(seed)
    return ([rng.choice(sentences) + "." for _ in range(lines)]
            + [f"{e.question} {e.answer} {e.answer} {e.answer}" for e in examples]
            + ["0 1 2 3 4 5 6 7 8 9 , ; : ? ! ( ) # ' Answer: unanswerable"])


def train_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 400, lines: int = 1500,
                         documents: int = 16) -> Path:
    """Train and save (``save_pretrained``) the tokenizer as the new directory ``out_dir``
    (corpus: :func:`training_corpus` of ``lines`` sentences from ``documents`` documents)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 bytes + specials + merges), got {vocab_size}")
    refuse_existing(out_dir)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(training_corpus(lines, documents=documents), trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                      pad_token="<|endoftext|>")
    wrapped.chat_template = CHATML_TEMPLATE
    with atomic_output_dir(out_dir) as tmp:
        wrapped.save_pretrained(tmp)
    return Path(out_dir)


def add_tokenizer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="new tokenizer directory")
    parser.add_argument("--vocab-size", type=int, default=400)


def run_tokenizer(args: argparse.Namespace) -> int:
    out = train_tiny_tokenizer(args.out, args.vocab_size)
    print(f"wrote {out}")
    return 0
