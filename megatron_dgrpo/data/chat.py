"""Chat formatting and tokenization behind one small interface, for HF tokenizers and sentencepiece.

* :class:`HFChatTokenizer` renders with the tokenizer's own chat template
  (``apply_chat_template``); a tokenizer without a template falls back to ChatML (below).
* :class:`SentencePieceChatTokenizer` has no template of its own and renders ChatML, the Qwen
  format: ``<|im_start|>user\\n{message}<|im_end|>\\n<|im_start|>assistant\\n``. The markers are
  single tokens only if the model declares them as user-defined symbols; otherwise they are
  encoded as ordinary text.

A response is rendered as the text that follows the prompt in a full conversation, so prompt and
response token ids concatenate to the tokenized conversation (used for the SFT loss mask).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def render_chatml_prompt(user_message: str) -> str:
    """ChatML prompt with the assistant turn opened."""
    return f"{IM_START}user\n{user_message}{IM_END}\n{IM_START}assistant\n"


class ChatTokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    name: str

    def render_prompt(self, user_message: str) -> str:
        """The chat-formatted prompt text, ending where the assistant's reply begins."""
        ...

    def render_response(self, user_message: str, response: str) -> str:
        """The text of the assistant turn (reply plus end-of-turn markers) after the prompt."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with no special tokens added."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``."""
        ...

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (special tokens included)."""
        ...


class HFChatTokenizer:
    """A ``transformers`` tokenizer, formatted with its chat template."""

    def __init__(self, tokenizer, name: str = "hf") -> None:
        self.tokenizer = tokenizer
        self.name = name
        self._has_template = bool(getattr(tokenizer, "chat_template", None))

    def render_prompt(self, user_message: str) -> str:
        if not self._has_template:
            return render_chatml_prompt(user_message)
        messages = [{"role": "user", "content": user_message}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def render_response(self, user_message: str, response: str) -> str:
        prompt = self.render_prompt(user_message)
        if self._has_template:
            messages = [{"role": "user", "content": user_message}, {"role": "assistant", "content": response}]
            full = self.tokenizer.apply_chat_template(messages, tokenize=False)
            if full.startswith(prompt):
                return full[len(prompt) :]
            return response + (self.tokenizer.eos_token or "")
        return f"{response}{IM_END}\n"

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)


class SentencePieceChatTokenizer:
    """A sentencepiece model, formatted as ChatML."""

    def __init__(self, processor, name: str = "sentencepiece") -> None:
        self.processor = processor
        self.name = name

    def render_prompt(self, user_message: str) -> str:
        return render_chatml_prompt(user_message)

    def render_response(self, user_message: str, response: str) -> str:
        return f"{response}{IM_END}\n"

    def encode(self, text: str) -> list[int]:
        return list(self.processor.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()


def load_chat_tokenizer(path: str | Path) -> ChatTokenizer:
    """A ``.model`` file loads as sentencepiece; a directory as an HF tokenizer (local files only)."""
    path = Path(path)
    if path.is_file():
        import sentencepiece

        return SentencePieceChatTokenizer(
            sentencepiece.SentencePieceProcessor(model_file=str(path)), name=path.name
        )
    if path.is_dir():
        from transformers import AutoTokenizer

        return HFChatTokenizer(
            AutoTokenizer.from_pretrained(str(path), local_files_only=True), name=path.name
        )
    raise ValueError(f"tokenizer path {str(path)!r} is neither a sentencepiece .model file nor a directory")
