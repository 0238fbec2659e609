"""Generator rules that keep answers unpredictable and lengths honest: sections, measured lengths,
unanswerable phrasing and share, answer pools."""

import math
import re
from collections import Counter

import pytest

from megatron_dgrpo.data.chat import load_chat_tokenizer
from megatron_dgrpo.data.synth import SynthConfig, SynthGenerator
from megatron_dgrpo.data.synth.length import nearest_bucket
from megatron_dgrpo.data.synth.tasks.grounding import COMMON_FACTS, MIN_ALTERNATIVES

HEADING = re.compile(r"^## Section (\d+)(: .+)?$", re.MULTILINE)
NAME = r"[A-Z][a-z]+ [A-Z][a-z]+"
CHI2_3DOF_P001 = 16.27  # chi-square critical value, 3 degrees of freedom, p = 0.001


def sections_of(document: str) -> list[tuple[int, bool, str]]:
    """(number, titled, body text) of each section, read from the headings."""
    heads = list(HEADING.finditer(document))
    ends = [h.start() for h in heads[1:]] + [len(document)]
    return [(int(h.group(1)), h.group(2) is not None, document[h.end():end].strip())
            for h, end in zip(heads, ends)]


@pytest.mark.parametrize("length", [64, 128, 256, 512, 4096])
def test_sections_adapt_to_the_length_and_section_answers_are_uniform(length):
    generator = SynthGenerator(SynthConfig(lengths=(length,), tasks=("section_lookup",), seed=3,
                                           filler_bank_size=500))
    expected_sections = max(4, round(length / 512))
    answers = Counter()
    count = 200 if length < 4096 else 48
    for index in range(count):
        ex = generator.example(index)
        sections = sections_of(ex.document)
        assert [n for n, _, _ in sections] == list(range(1, expected_sections + 1))
        assert all(body for _, _, body in sections)  # no empty section
        assert all(titled == (length / expected_sections >= 128) for _, titled, _ in sections)
        assert not ex.document[: ex.document.index("## Section 1")].strip()  # nothing before it
        answers[ex.answer] += 1
    assert sorted(answers, key=int) == [str(n) for n in range(1, expected_sections + 1)]
    if expected_sections == 4:
        chi2 = sum((answers[str(n)] - count / 4) ** 2 / (count / 4) for n in range(1, 5))
        assert chi2 < CHI2_3DOF_P001, answers


def test_nearest_bucket_rounds_on_a_log_scale():
    # the geometric midpoint of 1024 and 2048 is 1448.2; of 64 and 128, 90.5
    cases = {1024: "1k", 1100: "1k", 1448: "1k", 1449: "2k", 90: "64", 91: "128", 3000: "4k", 700: "512"}
    assert {n: nearest_bucket(n) for n in cases} == cases
    with pytest.raises(ValueError, match="num_tokens must be positive"):
        nearest_bucket(0)


def _log2_nearest_label(num_tokens: int) -> str:
    power = min(range(1, 30), key=lambda p: abs(math.log(num_tokens) - p * math.log(2)))
    value = 2**power
    return f"{value // 1024}k" if value >= 1024 else str(value)


def test_measured_lengths_with_a_tokenizer_are_within_15_percent(hf_tokenizer_dir):
    tokenizer = load_chat_tokenizer(hf_tokenizer_dir)
    generator = SynthGenerator(SynthConfig(lengths=(256, 512, 1024), seed=5, tokenizer=str(hf_tokenizer_dir),
                                           filler_bank_size=1000))
    ratios = []
    for index in range(8 * 3 * 5):  # every task at every length, over all depths
        ex = generator.example(index)
        assert ex.num_tokens == len(tokenizer.encode(ex.document))
        ratios.append(ex.num_tokens / ex.target_tokens)
        assert abs(ratios[-1] - 1) <= 0.15, (ex.task, ex.target_tokens, ex.num_tokens)
        assert ex.length_bucket == _log2_nearest_label(ex.num_tokens) == {256: "256", 512: "512", 1024: "1k"}[
            ex.target_tokens]
    assert abs(sum(ratios) / len(ratios) - 1) < 0.03  # no systematic overshoot from BPE joins


def test_documents_whose_content_exceeds_the_target_are_labelled_by_their_measured_length(hf_tokenizer_dir):
    generator = SynthGenerator(SynthConfig(lengths=(64,), tasks=("multihop",), hops=(4,), seed=2,
                                           tokenizer=str(hf_tokenizer_dir), filler_bank_size=200))
    tokenizer = load_chat_tokenizer(hf_tokenizer_dir)
    for index in range(4):
        ex = generator.example(index)
        assert ex.num_tokens == len(tokenizer.encode(ex.document)) > 2 * 64  # four facts of ~26 tokens
        assert ex.length_bucket == _log2_nearest_label(ex.num_tokens) != "64"
        assert ex.target_tokens == 64


def _relation_questions(task: str, share: float, count: int) -> list:
    generator = SynthGenerator(SynthConfig(lengths=(512,), tasks=(task,), hops=(1,), seed=9,
                                           filler_bank_size=300, unanswerable_share=share))
    return [generator.example(i) for i in range(count)]


def test_unanswerable_questions_are_phrased_like_answerable_ones_and_bounded():
    one_hop = _relation_questions("multihop", 1 / 3, 20)
    grounded = _relation_questions("unanswerable", 1 / 3, 300)
    pattern = re.compile(rf"Who is the ([a-z]+) of ({NAME})\?")
    assert all(pattern.fullmatch(ex.question) for ex in one_hop + grounded)
    assert {ex.question_template for ex in grounded} == {ex.question_template for ex in one_hop} == {
        "Who is the {relation} of {person}?"}
    absent = [ex for ex in grounded if ex.answer == "unanswerable"]
    # a binomial(300, 1/3) share lies within 3 standard deviations (0.027 each) of 1/3
    assert abs(len(absent) / len(grounded) - 1 / 3) <= 3 * math.sqrt(2 / 9 / 300)
    # the documents of both kinds have the same shape: see check_unanswerable in test_synth_tasks.py
    assert "unanswerable" not in {ex.answer for ex in _relation_questions("unanswerable", 0.0, 30)}
    assert {ex.answer for ex in _relation_questions("unanswerable", 1.0, 30)} == {"unanswerable"}
    with pytest.raises(ValueError, match="synth.unanswerable_share"):
        SynthConfig(unanswerable_share=1.5).validate()


def test_every_counterfactual_subject_has_ten_alternative_values():
    assert MIN_ALTERNATIVES == 10
    for subject, truth, pool in COMMON_FACTS:
        assert len(set(pool) - {truth}) >= MIN_ALTERNATIVES, subject
