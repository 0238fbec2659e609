"""The refit probe's trainer side never forms ``[T, V]`` logits: at a fixed chunk size its
peak memory does not grow with the vocabulary beyond the chunk buffers.

Peak allocated bytes come from torch's CPU memory profiler (every allocation and free of
the call, in order). The same instrument on a full-logits log-softmax (what verification
did before) sees that one grow by ``T x V`` floats, so the bound is not vacuous. The
log-probs equal a float64 log-softmax of the model's full logits.
"""

import pytest
import torch

from megatron_dgrpo.parallel.launch import run_distributed

pytestmark = pytest.mark.multiproc

VOCABS = (1024, 8192, 32768)
CHUNK = 32                    # tokens per chunk of the probe
PROMPT, RESPONSE = 8, 512     # per probe sequence; two sequences: 1024 probed tokens


def peak_bytes(function):
    """(peak of bytes allocated and not yet freed during ``function()``, its result)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = function()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    level = peak = 0
    for event in events:
        level += event.nbytes()
        peak = max(peak, level)
    return peak, result


def _measure(rank, world_size):
    from megatron_dgrpo.models.config import ModelConfig, ParallelConfig
    from megatron_dgrpo.models.provider import build_gpt_model, initialize_parallel
    from megatron_dgrpo.rollout.verify import trainer_token_logprobs

    parallel = ParallelConfig()
    initialize_parallel(parallel, seed=3)
    generator = torch.Generator().manual_seed(0)
    out = {}
    for vocab in VOCABS:
        config = ModelConfig(vocab_size=vocab, max_position_embeddings=1024)
        model = build_gpt_model(config, parallel).eval()
        sequences = [torch.randint(0, vocab, (PROMPT + RESPONSE,), generator=generator).tolist()
                     for _ in range(2)]
        lengths = [PROMPT, PROMPT]
        probe = lambda: trainer_token_logprobs(model, config, sequences, lengths,  # noqa: E731
                                               chunk_tokens=CHUNK)
        probe()  # warm-up: lazily built buffers (rotary tables, masks) are not the probe's
        peak, logprobs = peak_bytes(probe)
        tokens = torch.tensor(sequences)
        with torch.no_grad():
            full = model(tokens, torch.arange(tokens.shape[1])[None], None)  # [2, S, V]
            reference = torch.log_softmax(full.double(), -1)  # the old way: all of [T, V]
            full_peak, _ = peak_bytes(lambda: torch.log_softmax(full.double(), -1))
        expected = [reference[i, PROMPT - 1:-1].gather(
            -1, tokens[i, PROMPT:, None])[:, 0].tolist() for i in range(2)]
        out[vocab] = (peak, full_peak, logprobs, expected)
    return out


@pytest.fixture(scope="module")
def measured():
    return run_distributed(_measure, 1)[0]


def test_probe_log_probs_equal_the_full_log_softmax(measured):
    for _, _, logprobs, expected in measured.values():
        for got, want in zip(logprobs, expected):
            assert got == pytest.approx(want, abs=2e-5)


def test_probe_peak_is_flat_in_the_vocabulary_beyond_the_chunk_buffers(measured):
    smallest, largest = VOCABS[0], VOCABS[-1]
    growth = measured[largest][0] - measured[smallest][0]
    chunk_buffer = CHUNK * (largest - smallest) * 4  # one fp32 [chunk, V] buffer's growth
    assert growth <= 4 * chunk_buffer, (growth, chunk_buffer)
    full_logits = 2 * RESPONSE * (largest - smallest) * 4  # [T, V] fp32 of the probed tokens
    assert growth < full_logits / 8


def test_the_instrument_sees_a_full_vocabulary_log_softmax_grow(measured):
    smallest, largest = VOCABS[0], VOCABS[-1]
    growth = measured[largest][1] - measured[smallest][1]
    assert growth >= 2 * (PROMPT + RESPONSE) * (largest - smallest) * 8  # float64 [T, V]
