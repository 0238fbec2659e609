"""THD packing against a brute-force reference: cu_seqlens, masks, labels, efficiency, optimality."""

import itertools
import random

import pytest
import torch

from megatron_dgrpo.data.pack import IGNORE_INDEX, Sample, pack_samples, plan_packs


def random_samples(rng, count, max_len=40):
    samples = []
    for index in range(count):
        prompt = rng.randint(1, max_len)
        response = rng.randint(0, max_len)
        base = 1000 * (index + 1)
        samples.append(
            Sample(list(range(base, base + prompt)), list(range(base + 500, base + 500 + response)))
        )
    return samples


def reference_layout(samples, indices, budget, pad_id, align):
    """Token by token, the way the module docstring describes the layout."""
    tokens, positions, labels, loss, response = [], [], [], [], []
    cu, cu_padded = [0], [0]
    for index in indices:
        sample = samples[index]
        ids = sample.prompt_ids + sample.response_ids
        slot = -(-len(ids) // align) * align
        for t in range(slot):
            real = t < len(ids)
            tokens.append(ids[t] if real else pad_id)
            positions.append(t if real else 0)
            has_next = t + 1 < len(ids)
            labels.append(ids[t + 1] if has_next else IGNORE_INDEX)
            loss.append(1.0 if has_next and t + 1 >= len(sample.prompt_ids) else 0.0)
            response.append(real and t >= len(sample.prompt_ids))
        cu.append(cu[-1] + len(ids))
        cu_padded.append(cu_padded[-1] + slot)
    tail = budget - len(tokens)
    return (
        tokens + [pad_id] * tail,
        positions + [0] * tail,
        labels + [IGNORE_INDEX] * tail,
        loss + [0.0] * tail,
        response + [False] * tail,
        cu,
        cu_padded,
    )


@pytest.mark.parametrize("align", [1, 4])
def test_packs_match_the_brute_force_layout(align):
    rng = random.Random(align)
    samples = random_samples(rng, 30)
    budget = 128
    packs, report = pack_samples(samples, budget, pad_id=7, align=align)
    for pack in packs:
        tokens, positions, labels, loss, response, cu, cu_padded = reference_layout(
            samples, pack.sample_indices, budget, 7, align
        )
        assert pack.tokens.tolist() == tokens
        assert pack.position_ids.tolist() == positions
        assert pack.labels.tolist() == labels
        assert pack.loss_mask.tolist() == loss
        assert pack.response_mask.tolist() == response
        assert pack.cu_seqlens.tolist() == cu and pack.cu_seqlens.dtype == torch.int32
        assert pack.cu_seqlens_padded.tolist() == cu_padded and cu_padded[-1] <= budget
    packed = sorted(i for pack in packs for i in pack.sample_indices)
    assert packed == list(range(len(samples)))  # each sample exactly once
    real = sum(len(s) for s in samples)
    assert report.real_tokens == real
    assert report.efficiency == pytest.approx(real / (len(packs) * budget))
    assert report.num_packs == len(packs) and report.num_dropped == 0


def optimal_pack_count(lengths, budget):
    """Fewest packs by trying every assignment (tiny inputs only)."""
    for packs in range(1, len(lengths) + 1):
        for assignment in itertools.product(range(packs), repeat=len(lengths)):
            loads = [0] * packs
            for length, pack in zip(lengths, assignment):
                loads[pack] += length
            if max(loads) <= budget:
                return packs
    return len(lengths)


def test_first_fit_decreasing_is_near_optimal_on_small_inputs():
    rng = random.Random(0)
    for _ in range(25):
        lengths = [rng.randint(1, 10) for _ in range(rng.randint(1, 7))]
        packs, dropped = plan_packs(lengths, budget=10)
        assert not dropped
        assert all(sum(lengths[i] for i in pack) <= 10 for pack in packs)
        optimum = optimal_pack_count(lengths, 10)
        assert optimum <= len(packs) <= 11 / 9 * optimum + 6 / 9  # FFD's tight bound


def test_too_long_samples_are_dropped_and_reported():
    samples = [Sample([1] * 5, [2] * 5), Sample([1] * 30, [2]), Sample([3], [4])]
    packs, report = pack_samples(samples, budget=16)
    assert [p.sample_indices for p in packs] == [[0, 2]]
    assert report.num_dropped == 1 and report.real_tokens == 12 and report.efficiency == 12 / 16
    assert "1 dropped" in report.format()


def test_invalid_inputs_are_rejected():
    with pytest.raises(ValueError, match="budget"):
        plan_packs([3], budget=0)
    with pytest.raises(ValueError, match="empty sample"):
        pack_samples([Sample([], [])], budget=8)


def test_loaded_examples_pack_with_the_loss_on_the_response_only(
    tmp_path, public_row, write_parquet, hf_tokenizer_dir
):
    from megatron_dgrpo.data.chat import load_chat_tokenizer
    from megatron_dgrpo.data.longblocks import LongBlocksConfig, LongBlocksLoader
    from megatron_dgrpo.data.prepare import response_ids
    from megatron_dgrpo.data.schema import PUBLIC_SCHEMA

    write_parquet(tmp_path / "a.parquet", [public_row(0), public_row(1, answer="blue")], schema=PUBLIC_SCHEMA)
    tokenizer = load_chat_tokenizer(hf_tokenizer_dir)
    examples = list(LongBlocksLoader(LongBlocksConfig(paths=(str(tmp_path),), split="all"), tokenizer))
    samples = [Sample(e.prompt_ids, response_ids(e, tokenizer, e.reference_answer)) for e in examples]
    (pack,), report = pack_samples(samples, budget=1024)
    assert report.num_packs == 1
    for i, index in enumerate(pack.sample_indices):
        start, end = pack.cu_seqlens_padded[i].item(), pack.cu_seqlens_padded[i].item() + len(samples[index])
        response = pack.tokens[start:end][pack.response_mask[start:end]].tolist()
        assert tokenizer.decode(response) == f"{examples[index].reference_answer}<|im_end|>\n"
        trained_targets = pack.labels[start:end][pack.loss_mask[start:end].bool()].tolist()
        assert trained_targets == response
