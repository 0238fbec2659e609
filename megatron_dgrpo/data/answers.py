"""The answer-extraction convention: how the final answer is read out of a model response.

Default convention, applied in order:

1. reasoning inside ``<think>...</think>`` is dropped (``strip_thinking``);
2. if the response has ``<answer>...</answer>`` tags (``tag``), the content of the last pair wins;
3. else if a line starts with ``Answer:`` (``line_prefix``, case-insensitive, optional markdown
   emphasis such as ``**Answer:**``), the text after the last such prefix, to the end, wins;
4. else ``fallback``: ``"last_line"`` (the last non-empty line), ``"full"`` (the whole response)
   or ``"empty"`` (no answer, which scores 0 against any non-empty reference).

The instruction appended to prompts (:meth:`AnswerFormat.instruction`) asks for step 3's form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FALLBACKS = ("last_line", "full", "empty")
_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)


@dataclass
class AnswerFormat:
    """Options of the answer-extraction convention (see the module docstring)."""

    tag: str = "answer"
    line_prefix: str = "Answer:"
    strip_thinking: bool = True
    fallback: str = "last_line"
    unanswerable_word: str = "unanswerable"

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][\w-]*", self.tag):
            raise ValueError(f"answer_format.tag must be a plain tag name, got {self.tag!r}")
        if not self.line_prefix.strip():
            raise ValueError("answer_format.line_prefix must not be empty")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"answer_format.fallback must be one of {FALLBACKS}, got {self.fallback!r}")

    def instruction(self) -> str:
        """The sentence appended to questions so that responses follow the convention."""
        return (
            f'End your reply with a final line of the form "{self.line_prefix} <answer>". '
            "If the document does not contain the answer, write "
            f'"{self.line_prefix} {self.unanswerable_word}".'
        )


def strip_thinking(response: str) -> str:
    """``response`` without its ``<think>...</think>`` blocks (an unclosed one runs to the end)."""
    return _THINK.sub("", response)


def extract_answer(response: str, fmt: AnswerFormat | None = None) -> str:
    """The answer part of ``response`` under ``fmt`` (stripped; may be empty)."""
    fmt = fmt or AnswerFormat()
    text = strip_thinking(response) if fmt.strip_thinking else response
    tagged = re.findall(rf"<{fmt.tag}>(.*?)</{fmt.tag}>", text, flags=re.DOTALL | re.IGNORECASE)
    if tagged:
        return tagged[-1].strip()
    body = re.escape(fmt.line_prefix.strip().rstrip(":"))
    colon = ":" if fmt.line_prefix.strip().endswith(":") else ""
    prefix = re.compile(rf"^[ \t>*_#-]*{body}[*_]*{colon}[*_]*", re.IGNORECASE | re.MULTILINE)
    matches = list(prefix.finditer(text))
    if matches:
        return text[matches[-1].end() :].strip()
    if fmt.fallback == "full":
        return text.strip()
    if fmt.fallback == "last_line":
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else ""
    return ""
