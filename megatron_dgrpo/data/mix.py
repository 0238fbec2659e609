"""The stream of training examples a run draws from: one source, or several mixed by token share.

:class:`ExampleStream` serves one loader's examples epoch after epoch, in file order or
shuffled (:func:`buffer_shuffled`), and resumes from a position (what ``dgrpo train`` reads).
:class:`TokenShareMixer` mixes a long-context and a short-context source by token share:

the rule needs no random numbers: the next item comes from the long source whenever the long
share of tokens drawn so far is at or below ``long_share`` (default 0.9, the paper's best trade-off),
otherwise from the short source. After N tokens the realized share is within
``max_item_tokens / N`` of the target. Each source is opened as ``open(epoch, position)`` and
yields items from ``position`` on; when it runs out the next epoch starts at position 0 (sources may
reshuffle per epoch). The whole state is a few integers and the sources' order records,
returned by :meth:`state_dict` for the training checkpoint; :meth:`load_state_dict` resumes
exactly where the saved mixer stood.

**Shuffling a stream.** Loaders stream their files, so an epoch is shuffled through a buffer
(:func:`buffer_shuffled`, the shuffle-buffer scheme of streaming datasets): with a buffer at
least as large as the epoch every order is equally likely; a smaller one moves each item at
most a buffer's length earlier. The order of an epoch is a function of (seed, epoch) alone,
so resuming re-reads the epoch's first ``position`` items of the same order; the state is
the position and a record of the order (buffer, seed), checked on resume.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
SourceOpener = Callable[[int, int], Iterable[T]]
SOURCES = ("long", "short")
_END = object()


@dataclass
class MixConfig:
    """``long_share``: target fraction of training tokens drawn from the long-context source."""

    long_share: float = 0.9

    def validate(self) -> None:
        if not 0.0 <= self.long_share <= 1.0:
            raise ValueError(f"mix.long_share must be in [0, 1], got {self.long_share}")


@dataclass(frozen=True)
class MixedItem(Generic[T]):
    """An item and the source (``"long"`` or ``"short"``) it came from."""

    item: T
    source: str


def buffer_shuffled(items: Iterable[T], buffer: int, rng: random.Random) -> Iterator[T]:
    """``items`` in a random order drawn from ``rng``, holding at most ``buffer`` of them.

    The first ``buffer`` items fill the buffer; each further item takes the place of a
    uniformly chosen held one, which is yielded; at the end the held items come out in a
    uniformly random order. With ``buffer`` >= the number of items that is a uniformly random
    permutation; ``buffer`` <= 1 keeps the order.
    """
    held: list[T] = []
    for item in items:
        if len(held) < buffer:
            held.append(item)
            continue
        if not held:  # buffer <= 0
            yield item
            continue
        slot = rng.randrange(len(held))
        yield held[slot]
        held[slot] = item
    rng.shuffle(held)
    yield from held


FILE_ORDER = {"shuffle_buffer": 0, "seed": ""}  # the order of a checkpoint that names none


class _Reread(Generic[T]):
    """The opener :func:`reread_source` returns; ``order`` names the order it reads in (what
    a checkpoint records, so that a resume in another order is refused)."""

    def __init__(self, source: Iterable[T], shuffle_buffer: int, seed: str) -> None:
        self.source, self.shuffle_buffer, self.seed = source, shuffle_buffer, seed
        self.order = ({"shuffle_buffer": shuffle_buffer, "seed": seed} if shuffle_buffer > 1
                      else dict(FILE_ORDER))

    def __call__(self, epoch: int, position: int) -> Iterator[T]:
        iterator = iter(self.source)
        if self.shuffle_buffer > 1:
            iterator = buffer_shuffled(iterator, self.shuffle_buffer,
                                       random.Random(f"{self.seed}:{epoch}"))
        for read in range(position):
            if next(iterator, _END) is _END:
                raise ValueError(f"the checkpoint resumes at example {position} of epoch {epoch}, "
                                 f"but the data has only {read} now: it changed since the "
                                 "checkpoint was saved")
        return iterator


def reread_source(source: Iterable[T], shuffle_buffer: int = 0, seed: str = "") -> SourceOpener:
    """A source opener over a re-iterable ``source`` (e.g. a ``LongBlocksLoader``): every
    epoch reads it again, in its own order, or with ``shuffle_buffer`` > 1 in the order
    :func:`buffer_shuffled` draws from ``random.Random(f"{seed}:{epoch}")``, from
    ``position`` on."""
    return _Reread(source, shuffle_buffer, seed)


def _check_order(name: str, saved: dict | None, current: dict | None) -> None:
    """Refuse resuming ``name`` in another order than the checkpoint's (``None``: an opener
    that does not describe its order)."""
    if saved is not None and current is not None and saved != current:
        raise ValueError(f"the {name} data was read in the order {saved} (shuffle_buffer, seed) "
                         f"when the checkpoint was saved, but is configured as {current}: "
                         "resume with the checkpoint's data.shuffle_buffer and seed")


class _Cursor:
    def __init__(self, name: str, opener: SourceOpener) -> None:
        self.name, self.opener = name, opener
        self.epoch = self.position = self.tokens = 0
        self._iterator: Iterator | None = None

    def next_item(self):
        """The next item, starting the next epoch when the current one is exhausted."""
        if self._iterator is None:
            self._iterator = iter(self.opener(self.epoch, self.position))
        item = next(self._iterator, _END)
        if item is _END:
            if self.position == 0:
                raise ValueError(f"the {self.name} source yields no items in epoch {self.epoch}")
            self.epoch, self.position = self.epoch + 1, 0
            self._iterator = iter(self.opener(self.epoch, 0))
            item = next(self._iterator, _END)
            if item is _END:
                raise ValueError(f"the {self.name} source yields no items in epoch {self.epoch}")
        self.position += 1
        return item

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "tokens": self.tokens}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self.tokens = state["epoch"], state["position"], state["tokens"]
        self._iterator = None


class TokenShareMixer(Generic[T]):
    """Infinite iterator of :class:`MixedItem`; ``num_tokens(item)`` measures an item in tokens."""

    def __init__(
        self,
        long_source: SourceOpener,
        short_source: SourceOpener,
        num_tokens: Callable[[T], int],
        config: MixConfig | None = None,
    ) -> None:
        self.config = config or MixConfig()
        self.config.validate()
        self.num_tokens = num_tokens
        self._cursors = {"long": _Cursor("long", long_source), "short": _Cursor("short", short_source)}

    def _pick(self) -> str:
        share = self.config.long_share
        long_tokens, short_tokens = self._cursors["long"].tokens, self._cursors["short"].tokens
        if share == 1.0 or (share > 0.0 and long_tokens <= share * (long_tokens + short_tokens)):
            return "long"
        return "short"

    def __iter__(self) -> TokenShareMixer[T]:
        return self

    def __next__(self) -> MixedItem[T]:
        cursor = self._cursors[self._pick()]
        item = cursor.next_item()
        cursor.tokens += self.num_tokens(item)
        return MixedItem(item, cursor.name)

    def take(self, count: int) -> list[T]:
        """The next ``count`` items (the stream interface of :class:`ExampleStream`)."""
        return [next(self).item for _ in range(count)]

    @property
    def long_token_share(self) -> float:
        """Fraction of tokens drawn so far that came from the long source (0.0 before any draw)."""
        total = sum(c.tokens for c in self._cursors.values())
        return self._cursors["long"].tokens / total if total else 0.0

    def state_dict(self) -> dict:
        return {
            "long_share": self.config.long_share,
            **{name: c.state() for name, c in self._cursors.items()},
            "order": {name: getattr(c.opener, "order", None) for name, c in self._cursors.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state["long_share"] != self.config.long_share:
            raise ValueError(
                f"mix.long_share is {self.config.long_share} but the checkpoint used {state['long_share']}"
            )
        saved_orders = state.get("order", {})
        for name in SOURCES:
            cursor = self._cursors[name]
            _check_order(name, saved_orders.get(name, FILE_ORDER),
                         getattr(cursor.opener, "order", None))
            cursor.restore(state[name])


class ExampleStream(Generic[T]):
    """Examples of one re-iterable source (e.g. a
    :class:`~megatron_dgrpo.data.longblocks.LongBlocksLoader`), epoch after epoch, in its
    own order or (``shuffle_buffer`` > 1) shuffled per epoch as :func:`reread_source`
    does with ``seed``; resumable.

    ``position`` counts examples consumed in the current epoch. Resuming re-reads the epoch
    up to that position (the loader streams; only the shuffle buffer is held in memory).
    """

    def __init__(self, source: Iterable[T], shuffle_buffer: int = 0, seed: str = ""):
        self.source = source
        self._open = reread_source(source, shuffle_buffer, seed)
        self.epoch, self.position = 0, 0
        self._iterator = self._open(0, 0)

    def take(self, count: int) -> list[T]:
        """The next ``count`` examples (a new epoch starts when the source is exhausted)."""
        examples = []
        while len(examples) < count:
            example = next(self._iterator, _END)
            if example is _END:
                if self.position == 0:
                    summary = getattr(self.source, "summary", None)
                    raise ValueError("the training data has no usable rows"
                                     + (f" ({summary.format()})" if summary else ""))
                self.epoch, self.position = self.epoch + 1, 0
                self._iterator = self._open(self.epoch, 0)
                continue
            self.position += 1
            examples.append(example)
        return examples

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "order": self._open.order}

    def load_state_dict(self, state: dict) -> None:
        _check_order("training", state.get("order", FILE_ORDER), self._open.order)
        self.epoch, self.position = state["epoch"], state["position"]
        self._iterator = self._open(self.epoch, self.position)


class Lookahead(Generic[T]):
    """A stream (:class:`ExampleStream` or :class:`TokenShareMixer`) whose next items can be
    read ahead without being consumed: :meth:`peek` draws them from the stream and holds
    them, and the next :meth:`take` returns them first (asynchronous rollouts sample the
    next step's prompts before the trainer takes them).

    :meth:`state_dict` is the stream's state *before* the held items, so a checkpoint
    resumes by drawing them again; :attr:`long_token_share` (a mixer's) counts them as drawn.
    """

    def __init__(self, stream) -> None:
        self.stream = stream
        self._held: list[T] = []
        self._state_before_held: dict | None = None

    def take(self, count: int) -> list[T]:
        """The next ``count`` items: the held ones first, then from the stream."""
        items, self._held = self._held[:count], self._held[count:]
        if not self._held:
            self._state_before_held = None
        return items + (self.stream.take(count - len(items)) if len(items) < count else [])

    def peek(self, count: int) -> list[T]:
        """The next ``count`` items, left to be taken (the same ones until they are)."""
        if not self._held:
            self._state_before_held = self.stream.state_dict()
        if len(self._held) < count:
            self._held += self.stream.take(count - len(self._held))
        return self._held[:count]

    @property
    def long_token_share(self) -> float | None:
        """The mixer's realised long-token share (held items included); None for one source."""
        return getattr(self.stream, "long_token_share", None)

    def state_dict(self) -> dict:
        return self._state_before_held if self._held else self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._held, self._state_before_held = [], None
        self.stream.load_state_dict(state)
