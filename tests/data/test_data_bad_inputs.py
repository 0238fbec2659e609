"""Every bad-input path of the data package fails with a message naming the problem."""

import random

import pytest

from megatron_dgrpo.data.chat import load_chat_tokenizer
from megatron_dgrpo.data.evaluate import score_items
from megatron_dgrpo.data.longblocks import LongBlocksConfig
from megatron_dgrpo.data.pack import plan_packs
from megatron_dgrpo.data.prepare import prepare_longblocks
from megatron_dgrpo.data.rewards import RewardConfig
from megatron_dgrpo.data.synth import ApproxTokenCounter, SynthConfig
from megatron_dgrpo.data.synth.document import DocumentBuilder, Needle
from megatron_dgrpo.data.synth.filler import FillerBank
from megatron_dgrpo.data.synth.writer import write_synth_dataset


@pytest.mark.parametrize(
    "options,message",
    [
        ({"num_examples": 0}, "synth.num_examples"),
        ({"lengths": ()}, "synth.lengths"),
        ({"lengths": (32,)}, "synth.lengths"),
        ({"filler_bank_size": 0}, "synth.filler_bank_size"),
        ({"tokens_per_section": 0}, "synth.tokens_per_section"),
        ({"tokenizer": "/nonexistent/tokenizer"}, "synth.tokenizer"),
    ],
)
def test_synth_config(options, message):
    with pytest.raises(ValueError, match=message):
        SynthConfig(**options).validate()


@pytest.mark.parametrize(
    "options,message",
    [
        ({"validation_fraction": 1.5}, "longblocks.validation_fraction"),
        ({"batch_rows": 0}, "longblocks.batch_rows"),
        ({"min_prompt_tokens": -1}, "longblocks.max_prompt_tokens"),
    ],
)
def test_longblocks_config(options, message):
    with pytest.raises(ValueError, match=message):
        LongBlocksConfig(paths=("x",), **options).validate()


def test_generator_parts_and_writer(tmp_path):
    counter = ApproxTokenCounter()
    with pytest.raises(ValueError, match="filler bank size"):
        FillerBank(counter, seed=0, size=0)
    bank = FillerBank(counter, seed=0, size=10)
    with pytest.raises(ValueError, match="tokens_per_section"):
        DocumentBuilder(bank, counter, tokens_per_section=0)
    with pytest.raises(ValueError, match="needle depth"):
        DocumentBuilder(bank, counter).build(random.Random(0), 256, [Needle("x.", 1.5)])
    config = SynthConfig(num_examples=2, lengths=(256,))
    with pytest.raises(ValueError, match="shard_size"):
        write_synth_dataset(config, tmp_path / "a", shard_size=0)
    with pytest.raises(ValueError, match="workers"):
        write_synth_dataset(config, tmp_path / "a", workers=0)
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_path_prepare_eval_and_packing(tmp_path):
    with pytest.raises(ValueError, match="neither a sentencepiece .model file nor a directory"):
        load_chat_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="shard_size"):
        prepare_longblocks(LongBlocksConfig(paths=(str(tmp_path),)), None, tmp_path / "out", shard_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        score_items([], lambda prompts: [], RewardConfig(), batch_size=0)
    with pytest.raises(ValueError, match="align"):
        plan_packs([3], budget=8, align=0)
