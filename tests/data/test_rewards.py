"""Rewards against hand-computed values, edge cases, and the [0, 1] range on arbitrary text."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_dgrpo.data.answers import AnswerFormat
from megatron_dgrpo.data.rewards import (
    REWARDS,
    RewardConfig,
    abstention,
    abstention_or_exact_match,
    exact_match,
    first_number,
    normalize_text,
    numeric_match,
    rouge_l,
    set_f1,
    text_tokens,
    token_f1,
)


def test_normalization_drops_case_punctuation_articles_and_applies_nfkc():
    assert normalize_text("  The Quick, BROWN fox!! ") == "quick brown fox"
    assert normalize_text("Ｆｕｌｌ－ｗｉｄｔｈ") == "full width"  # NFKC folds full-width forms
    assert normalize_text("Straße") == "strasse"  # case-folding, not lower()
    assert normalize_text("...!?") == ""


def test_cjk_characters_are_single_tokens():
    assert text_tokens("東京は大きい city") == ["東", "京", "は", "大", "き", "い", "city"]


@pytest.mark.parametrize(
    "answer,reference,expected",
    [
        ("Paris", "paris.", 1.0),
        ("The Paris", "Paris", 1.0),
        ("Paris, France", "Paris", 0.0),
        ("", "", 1.0),
        ("", "Paris", 0.0),
        ("Zoë Brask", "zoë  brask", 1.0),
    ],
)
def test_exact_match(answer, reference, expected):
    assert exact_match(answer, reference) == expected


@pytest.mark.parametrize(
    "answer,reference,expected",
    [
        ("the cat sat", "a cat sat down", 0.8),  # P = 2/2, R = 2/3
        ("cat cat", "cat", 2 * 0.5 * 1.0 / 1.5),  # multiset: P = 1/2, R = 1
        ("", "", 1.0),
        ("", "cat", 0.0),
        ("dog", "cat", 0.0),
        ("猫が好き", "猫が好きです", 0.8),  # 4 shared of 4 and 6 character tokens
    ],
)
def test_token_f1(answer, reference, expected):
    assert token_f1(answer, reference) == pytest.approx(expected)


@pytest.mark.parametrize(
    "answer,reference,expected",
    [
        ("Brask Ovel; Tam Rin", "tam rin; brask ovel", 1.0),
        ("Brask Ovel, Tam Rin and Kel Dor", "Brask Ovel; Tam Rin", 0.8),  # P = 2/3, R = 1
        ("Brask Ovel\nTam Rin", "Brask Ovel; Kel Dor; Tam Rin; Vy Lo", 2 * 1 * 0.5 / 1.5),
        ("Brask Ovel; Brask Ovel", "Brask Ovel", 1.0),  # duplicates collapse
        ("", "", 1.0),
        (";;", "Brask Ovel", 0.0),
    ],
)
def test_set_f1(answer, reference, expected):
    assert set_f1(answer, reference) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text,value",
    [
        ("1,234 crates", 1234.0),
        ("$1,200.50", 1200.5),
        ("-3.5 m", -3.5),
        (".5", 0.5),
        ("12kg", 12.0),
        ("about seven", 7.0),
        ("Section 7 and 8", 7.0),
        ("１２３", 123.0),
        ("12,3456", 12.0),  # not a thousands group: the number stops at the comma
        ("1,5", 1.0),
        ("none", None),
    ],
)
def test_first_number(text, value):
    assert first_number(text) == value


@pytest.mark.parametrize(
    "answer,reference,expected",
    [
        ("There were 4,970 crates in total.", "4970", 1.0),
        ("4970.0", "4,970", 1.0),
        ("4971", "4970", 0.0),
        ("seven", "7", 1.0),
        ("no idea", "7", 0.0),
        ("", "7", 0.0),
        ("blue", "Blue.", 1.0),  # reference without a number falls back to exact match
    ],
)
def test_numeric_match(answer, reference, expected):
    assert numeric_match(answer, reference) == expected


@pytest.mark.parametrize(
    "answer,reference,expected",
    [
        ("Unanswerable.", "unanswerable", 1.0),
        ("The document doesn't say.", "unanswerable", 1.0),
        ("It is not mentioned in the text", "unanswerable", 1.0),
        ("Talvor Quenby", "unanswerable", 0.0),
        ("Talvor Quenby", "Brim Tiall", 1.0),  # neither abstains
        ("unknown", "Brim Tiall", 0.0),
        ("", "unanswerable", 0.0),
    ],
)
def test_abstention(answer, reference, expected):
    assert abstention(answer, reference) == expected


@pytest.mark.parametrize(
    "answer,reference,expected",
    [
        ("The document doesn't say.", "unanswerable", 1.0),
        ("Talvor Quenby", "unanswerable", 0.0),
        ("Talvor Quenby", "Brim Tiall", 0.0),  # unlike abstention: a wrong name is wrong
        ("brim tiall.", "Brim Tiall", 1.0),
        ("unanswerable", "Brim Tiall", 0.0),
    ],
)
def test_abstention_or_exact_match(answer, reference, expected):
    assert abstention_or_exact_match(answer, reference) == expected
    assert RewardConfig().score(f"Answer: {answer}", reference, task="unanswerable") == expected


def test_rouge_l_matches_the_longest_common_subsequence_by_hand():
    # tokens: [cat, sat, on, mat] vs [cat, lay, on, mat]: LCS = 3, P = R = 3/4
    assert rouge_l("The cat sat on the mat.", "the cat lay on the mat") == pytest.approx(0.75)
    assert rouge_l("", "") == 1.0
    assert rouge_l("", "cat") == 0.0
    assert rouge_l("ünïcödé wörds", "ünïcödé wörds") == 1.0  # rouge-score's own tokenizer would drop these


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40))
def test_every_reward_is_a_float_in_unit_interval(answer, reference):
    for name, reward in REWARDS.items():
        value = reward(answer, reference)
        assert isinstance(value, float), name
        assert 0.0 <= value <= 1.0, name


def test_reward_config_picks_reward_per_task_and_extracts_the_answer():
    config = RewardConfig()
    config.validate()
    response = "Let me add them: 1,200 + 3,770.\nAnswer: 4,970 crates"
    assert config.score(response, "4970", task="sum_values") == 1.0
    assert config.score(response, "4970", task="multihop") == 0.0  # exact match on "4 970 crates"
    assert config.score("Answer: green sky", "green", task=None) == pytest.approx(2 / 3)  # default token_f1
    tagged = RewardConfig(answer_format=AnswerFormat(line_prefix="Final:"))
    assert tagged.score("Final: Kel Dor; Tam Rin", "Tam Rin; Kel Dor", task="list_items") == 1.0


def test_reward_config_validation_names_the_bad_option():
    with pytest.raises(ValueError, match=r"per_task\['multihop'\].*bleu"):
        RewardConfig(per_task={"multihop": "bleu"}).validate()
    with pytest.raises(ValueError, match="rewards.default"):
        RewardConfig(default="nope").validate()
    with pytest.raises(ValueError, match="fallback"):
        RewardConfig(answer_format=AnswerFormat(fallback="guess")).validate()


@pytest.mark.parametrize("length, expected", [(4, 0.0), (6, 0.0), (7, -0.25), (8, -0.5),
                                              (10, -1.0), (12, -1.0)])
def test_overlong_penalty_is_daposs_soft_punishment(length, expected):
    from megatron_dgrpo.data.rewards import overlong_penalty

    # budget 10, buffer 4: free up to 6 tokens, then (6 - length) / 4 down to -1
    assert overlong_penalty(length, 10, 4) == pytest.approx(expected)
