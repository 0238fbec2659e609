"""Token-share mixing: proportions, exact resume from state_dict, epochs, validation; reading
ahead (Lookahead, for asynchronous rollouts)."""

import itertools

import pytest

from megatron_dgrpo.data.mix import ExampleStream, ListSource, Lookahead, MixConfig, TokenShareMixer


def make_mixer(share=0.9, seed=0):
    long_items = [("L", i, 500 + 37 * (i % 11)) for i in range(23)]
    short_items = [("S", i, 40 + 13 * (i % 5)) for i in range(17)]
    return TokenShareMixer(
        ListSource(long_items, seed),
        ListSource(short_items, seed + 1),
        num_tokens=lambda item: item[2],
        config=MixConfig(long_share=share),
    )


@pytest.mark.parametrize("share", [0.9, 0.5, 0.25])
def test_realized_token_share_tracks_the_target(share):
    mixer = make_mixer(share)
    drawn = list(itertools.islice(mixer, 2000))
    long_tokens = sum(m.item[2] for m in drawn if m.source == "long")
    total = sum(m.item[2] for m in drawn)
    assert long_tokens / total == pytest.approx(share, abs=(500 + 37 * 10) / total)  # one item at most
    assert mixer.long_token_share == long_tokens / total
    assert {m.source for m in drawn} == {"long", "short"}
    assert all(m.item[0] == m.source[0].upper() for m in drawn)


@pytest.mark.parametrize("share,only", [(1.0, "long"), (0.0, "short")])
def test_extreme_shares_use_one_source(share, only):
    assert {m.source for m in itertools.islice(make_mixer(share), 50)} == {only}


def test_resume_from_state_dict_continues_exactly():
    reference = make_mixer()
    expected = list(itertools.islice(reference, 300))
    first = make_mixer()
    head = list(itertools.islice(first, 137))  # crosses several short-source epochs
    state = first.state_dict()
    resumed = make_mixer()
    resumed.load_state_dict(state)
    assert head + list(itertools.islice(resumed, 163)) == expected
    assert state["short"]["epoch"] >= 1


def test_each_epoch_visits_every_item_once_in_a_new_order():
    source = ListSource(list(range(10)), seed=4)
    epoch0, epoch1 = list(source(0, 0)), list(source(1, 0))
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1
    assert list(source(1, 7)) == epoch1[7:]


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="long_share"):
        MixConfig(long_share=1.5).validate()
    empty = TokenShareMixer(ListSource([]), ListSource([1]), num_tokens=lambda x: 1)
    with pytest.raises(ValueError, match="long source yields no items"):
        next(empty)
    other = make_mixer(0.5)
    with pytest.raises(ValueError, match="long_share"):
        other.load_state_dict(make_mixer(0.9).state_dict())


@pytest.mark.parametrize("stream", ["examples", "mixer"])
def test_lookahead_peeks_without_consuming_and_saves_the_state_before_the_peek(stream):
    """Asynchronous rollouts read the next step's examples ahead: a :class:`Lookahead`
    yields what the bare stream yields whatever it peeks, and its state after a peek
    resumes (into a fresh stream) with the peeked items first."""
    def make():
        return make_mixer() if stream == "mixer" else ExampleStream(list(range(7)))

    expected = make().take(12)
    ahead = Lookahead(make())
    got = ahead.take(3)
    assert ahead.peek(3) == ahead.peek(2) + [expected[5]] == expected[3:6]
    saved = ahead.state_dict()
    got += ahead.take(2) + ahead.take(4)  # the held ones first, then the stream
    assert got == expected[:9]
    resumed = Lookahead(make())
    resumed.load_state_dict(saved)
    assert resumed.take(9) == expected[3:12]
    assert (ahead.long_token_share is None) == (stream == "examples")
