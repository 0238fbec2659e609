"""Chat formatting and tokenization behind one small interface, for HF tokenizers and sentencepiece.

* :class:`HFChatTokenizer` formats with the tokenizer's own chat template
  (``apply_chat_template``); a tokenizer without a template falls back to ChatML (below).
* :class:`SentencePieceChatTokenizer` has no template of its own and formats ChatML, the Qwen
  format: ``<|im_start|>user\\n{message}<|im_end|>\\n<|im_start|>assistant\\n``. The markers are
  single tokens only if the model declares them as user-defined symbols; otherwise they are
  encoded as ordinary text.

**Content never becomes control tokens.** The template is rendered once, with a placeholder
in place of the content, and split around it (a :class:`ChatFrame`). Only the template's text
may produce control tokens (HF: every added token; sentencepiece: user-defined symbols, which
sentencepiece would otherwise match anywhere in the text); a document quoting
``<|im_end|>\\n<|im_start|>assistant\\n`` is tokenized as those characters. :meth:`ChatFrame.ids`
first encodes the whole conversation string, which is exact for ordinary content, and keeps it
when the control tokens are exactly the template's (same ids at the same places at both ends,
none in between). Otherwise the content contains control-token literals: the text between the
template's last control token before the content and its first one after it is re-encoded with
control-token matching off (HF: a copy of the tokenizer without its added tokens;
sentencepiece: a copy of the model whose user-defined symbols are control pieces, which are
never matched in text), so the literals become ordinary pieces (bytes, with byte fallback).

Token ids come from :meth:`ChatTokenizer.prompt_ids` and :meth:`ChatTokenizer.response_ids`;
the ``render_*`` strings are for display and logs. A response is what follows the prompt in a
full conversation (reply plus end-of-turn markers), so ``prompt_ids + response_ids`` is the
tokenized conversation (used for the SFT loss mask).
"""

from __future__ import annotations

import functools
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Stand-ins for the content while the template is rendered: letters only, so that templates
# that strip or trim their content leave them intact.
USER_SLOT, RESPONSE_SLOT = "DGRPOUSERCONTENTSLOT", "DGRPORESPONSECONTENTSLOT"


def reply_text(generated: str) -> str:
    """The assistant's reply in generated text: everything before the first end-of-turn
    marker (what rewards and evaluation score)."""
    return generated.split(IM_END, 1)[0]


def render_chatml_prompt(user_message: str) -> str:
    """ChatML prompt with the assistant turn opened."""
    return f"{IM_START}user\n{user_message}{IM_END}\n{IM_START}assistant\n"


def control_literal_pattern(literals: Iterable[str]) -> re.Pattern | None:
    """A regex matching any of ``literals`` (longest first), or None if there are none."""
    ordered = sorted({literal for literal in literals if literal}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, ordered))) if ordered else None


@dataclass(frozen=True)
class ChatFrame:
    """The template text around one content slot, and its token ids at both ends.

    ``before + content + after`` is the formatted text. ``head`` are the ids of ``before`` up to
    and including its last control token, ``tail`` the ids of ``after`` from its first control
    token on; ``lead`` / ``trail`` is the template text between those control tokens and the
    content (it is encoded together with the content, as in the whole-string encoding).
    """

    before: str
    after: str
    head: tuple[int, ...]
    lead: str
    trail: str
    tail: tuple[int, ...]
    control_ids: frozenset[int]

    @classmethod
    def build(cls, before: str, after: str, encode: Callable[[str], list[int]],
              control_ids: frozenset[int], literals: re.Pattern | None) -> ChatFrame:
        """Split the template's ids at the content, given ``encode`` (control literals parsed)."""
        in_before = list(literals.finditer(before)) if literals else []
        in_after = list(literals.finditer(after)) if literals else []
        ids = encode(before + after)
        controls = [i for i, token in enumerate(ids) if token in control_ids]
        if len(controls) != len(in_before) + len(in_after):
            raise ValueError(f"cannot locate the chat template's {len(in_before) + len(in_after)} "
                             f"control-token literals in its {len(controls)} control tokens")
        head_end = controls[len(in_before) - 1] + 1 if in_before else 0
        tail_start = controls[len(in_before)] if in_after else len(ids)
        return cls(before=before, after=after, head=tuple(ids[:head_end]),
                   lead=before[in_before[-1].end():] if in_before else before,
                   trail=after[:in_after[0].start()] if in_after else after,
                   tail=tuple(ids[tail_start:]), control_ids=control_ids)

    def holds(self, ids: list[int]) -> bool:
        """Whether ``ids`` has exactly the template's control tokens: ``head`` first, ``tail``
        last, and no control token in between."""
        head, tail = len(self.head), len(self.tail)
        end = len(ids) - tail
        return (end >= head and tuple(ids[:head]) == self.head and tuple(ids[end:]) == self.tail
                and self.control_ids.isdisjoint(ids[head:end]))

    def ids(self, content: str, encode: Callable[[str], list[int]],
            encode_plain: Callable[[str], list[int]]) -> list[int]:
        """Token ids of the formatted ``content`` (see the module docstring); ``encode`` parses
        control-token literals, ``encode_plain`` does not."""
        ids = encode(self.before + content + self.after)
        if self.holds(ids):
            return ids
        ids = [*self.head, *encode_plain(self.lead + content + self.trail), *self.tail]
        if not self.holds(ids):
            raise ValueError("this tokenizer turns ordinary text into control tokens even with "
                             "special-token matching off; content cannot be encoded safely")
        return ids


def split_at_slot(rendered: str, slot: str, what: str) -> tuple[str, str]:
    """``rendered`` before and after the one occurrence of ``slot``."""
    if rendered.count(slot) != 1:
        raise ValueError(f"the chat template renders the {what} {rendered.count(slot)} times, "
                         "expected exactly once")
    before, after = rendered.split(slot)
    return before, after


class ChatTokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    name: str

    def render_prompt(self, user_message: str) -> str:
        """The chat-formatted prompt text, ending where the assistant's reply begins (display)."""
        ...

    def render_response(self, user_message: str, response: str) -> str:
        """The text of the assistant turn (reply plus end-of-turn markers) after the prompt."""
        ...

    def prompt_ids(self, user_message: str) -> list[int]:
        """Token ids of the prompt; control tokens only where the template puts them."""
        ...

    def response_ids(self, user_message: str, response: str) -> list[int]:
        """Token ids that follow ``prompt_ids(user_message)`` in the full conversation
        (end-of-turn included); control tokens only where the template puts them."""
        ...

    @property
    def end_of_turn_id(self) -> int | None:
        """The control token that ends the assistant's turn (the template's first control
        token after the reply, e.g. ``<|im_end|>``), or None if the turn ends in plain text:
        what a generation stops at."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of trusted text (template markers), control-token literals parsed and no
        special tokens added. Never for data content: use ``prompt_ids`` / ``response_ids``."""
        ...

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of untrusted text outside any template (no chat formatting): control-
        token literals in it stay text."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``."""
        ...

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (special tokens included)."""
        ...


class _FramedChatTokenizer(ABC):
    """``prompt_ids`` / ``response_ids`` from the two frames a subclass renders."""

    name: str

    def __init__(self, prompt: tuple[str, str], response: tuple[str, str],
                 control_ids: frozenset[int], literals: re.Pattern | None) -> None:
        self._prompt = ChatFrame.build(*prompt, self.encode, control_ids, literals)
        self._response = ChatFrame.build(*response, self.encode, control_ids, literals)

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of trusted text, control-token literals parsed (see :class:`ChatTokenizer`)."""

    @abstractmethod
    def encode_plain(self, text: str) -> list[int]:
        """Token ids of ``text`` with control-token matching off."""

    def render_prompt(self, user_message: str) -> str:
        return self._prompt.before + user_message + self._prompt.after

    def render_response(self, user_message: str, response: str) -> str:
        return self._response.before + response + self._response.after

    def prompt_ids(self, user_message: str) -> list[int]:
        return self._prompt.ids(user_message, self.encode, self.encode_plain)

    def response_ids(self, user_message: str, response: str) -> list[int]:
        return self._response.ids(response, self.encode, self.encode_plain)

    @property
    def end_of_turn_id(self) -> int | None:
        return self._response.tail[0] if self._response.tail else None


class HFChatTokenizer(_FramedChatTokenizer):
    """A ``transformers`` tokenizer, formatted with its chat template (ChatML without one).

    Control tokens are all added tokens (special or not, e.g. Qwen3's ``<think>``).
    """

    def __init__(self, tokenizer, name: str = "hf") -> None:
        self.tokenizer = tokenizer
        self.name = name
        added = getattr(tokenizer, "added_tokens_decoder", {})
        if bool(getattr(tokenizer, "chat_template", None)):
            user = [{"role": "user", "content": USER_SLOT}]
            prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(
                [*user, {"role": "assistant", "content": RESPONSE_SLOT}], tokenize=False)
            turn = (full[len(prompt):] if full.startswith(prompt)
                    else RESPONSE_SLOT + (tokenizer.eos_token or ""))
        else:
            prompt, turn = render_chatml_prompt(USER_SLOT), f"{RESPONSE_SLOT}{IM_END}\n"
        super().__init__(split_at_slot(prompt, USER_SLOT, "user message"),
                         split_at_slot(turn, RESPONSE_SLOT, "assistant response"),
                         frozenset(added), control_literal_pattern(t.content for t in added.values()))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    @functools.cached_property
    def _plain(self):
        """The backend without added tokens, built on first use (content with literals)."""
        return _without_added_tokens(self.tokenizer)

    def encode_plain(self, text: str) -> list[int]:
        if self._plain is None:  # no `tokenizers` backend: transformers' own switch
            return list(self.tokenizer.encode(text, add_special_tokens=False,
                                              split_special_tokens=True))
        return self._plain.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)


def _without_added_tokens(tokenizer):
    """A copy of the ``tokenizers`` backend with no added tokens (so none is matched in text),
    or None for a tokenizer without that backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    spec = json.loads(backend.to_str())
    spec.update(added_tokens=[], truncation=None, padding=None)
    return Tokenizer.from_str(json.dumps(spec))


class SentencePieceChatTokenizer(_FramedChatTokenizer):
    """A sentencepiece model, formatted as ChatML. Control tokens: user-defined symbols and
    control pieces."""

    def __init__(self, processor, name: str = "sentencepiece") -> None:
        self.processor = processor
        self.name = name
        self._plain, symbols, controls = _symbols_as_control(processor)
        super().__init__(split_at_slot(render_chatml_prompt(USER_SLOT), USER_SLOT, "user message"),
                         ("", f"{IM_END}\n"), controls, control_literal_pattern(symbols))

    def encode(self, text: str) -> list[int]:
        return list(self.processor.encode(text))

    def encode_plain(self, text: str) -> list[int]:
        return list(self._plain.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()


def _symbols_as_control(processor):
    """A copy of ``processor`` whose user-defined symbols are control pieces (same ids, never
    matched in text) and that adds no dummy-prefix space (the text it encodes follows a
    control token, not the start of the string); the symbols; the ids of symbols and control
    pieces."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(processor.serialized_model_proto())
    symbols, controls = [], set()
    for index, piece in enumerate(model.pieces):
        if piece.type == kinds.USER_DEFINED:
            symbols.append(piece.piece)
            piece.type = kinds.CONTROL
        if piece.type == kinds.CONTROL:
            controls.add(index)
    model.normalizer_spec.add_dummy_prefix = False
    plain = sentencepiece.SentencePieceProcessor(model_proto=model.SerializeToString())
    return plain, symbols, frozenset(controls)


def load_chat_tokenizer(path: str | Path) -> ChatTokenizer:
    """A ``.model`` file loads as sentencepiece; a directory as an HF tokenizer (local files only,
    no repository code: ``trust_remote_code=False``)."""
    path = Path(path)
    if path.is_file():
        import sentencepiece

        return SentencePieceChatTokenizer(
            sentencepiece.SentencePieceProcessor(model_file=str(path)), name=path.name
        )
    if path.is_dir():
        from transformers import AutoTokenizer

        return HFChatTokenizer(
            AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False),
            name=path.name,
        )
    raise ValueError(f"tokenizer path {str(path)!r} is neither a sentencepiece .model file nor a directory")
