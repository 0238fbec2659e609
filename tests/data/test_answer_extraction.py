"""The answer-extraction convention: tags, then a final Answer: line, then the fallback."""

import pytest

from megatron_dgrpo.data.answers import AnswerFormat, extract_answer


@pytest.mark.parametrize(
    "response,expected",
    [
        ("Reasoning...\nAnswer: Paris", "Paris"),
        ("Answer: Lyon\nOn reflection...\nAnswer: Paris", "Paris"),  # the last one wins
        ("**Answer:** Paris", "Paris"),
        ("answer: paris", "paris"),
        ("Answer:\nKel Dor\nTam Rin", "Kel Dor\nTam Rin"),  # text to the end is kept (list answers)
        ("<answer>Paris</answer> and later Answer: Lyon", "Paris"),  # tags win over lines
        ("<answer>Rome</answer><answer> Paris </answer>", "Paris"),
        ("<think>Answer: Lyon</think>The capital.\nAnswer: Paris", "Paris"),
        ("<think>unfinished reasoning Answer: Lyon", ""),  # an unclosed think block is all reasoning
        ("I think it is\nParis", "Paris"),  # fallback: last non-empty line
        ("", ""),
        ("The answers: are here", "The answers: are here"),  # "answers:" is not the prefix
    ],
)
def test_default_convention(response, expected):
    assert extract_answer(response) == expected


def test_fallbacks_and_custom_prefix():
    assert extract_answer("line one\nline two", AnswerFormat(fallback="full")) == "line one\nline two"
    assert extract_answer("line one\nline two", AnswerFormat(fallback="empty")) == ""
    assert extract_answer("Final answer: 42", AnswerFormat(line_prefix="Final answer:")) == "42"
    assert extract_answer("<final>42</final>", AnswerFormat(tag="final")) == "42"
    late_thinking = "Answer: 2\n<think>\nAnswer: 1\n</think>"
    assert extract_answer(late_thinking) == "2"
    assert extract_answer(late_thinking, AnswerFormat(strip_thinking=False)) == "1\n</think>"


def test_instruction_states_the_convention():
    text = AnswerFormat(line_prefix="Final:").instruction()
    assert '"Final: <answer>"' in text and '"Final: unanswerable"' in text


def test_validation_names_the_bad_option():
    with pytest.raises(ValueError, match="tag"):
        AnswerFormat(tag="a b").validate()
    with pytest.raises(ValueError, match="line_prefix"):
        AnswerFormat(line_prefix="  ").validate()
