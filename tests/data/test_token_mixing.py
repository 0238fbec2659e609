"""Token-share mixing: proportions, exact resume from state_dict, epochs, validation; reading
ahead (Lookahead, for asynchronous rollouts); shuffled streams (buffer, per-epoch seed, resume)."""

import itertools
import random
from collections import Counter

import pytest

from megatron_dgrpo.data.mix import (
    ExampleStream,
    Lookahead,
    MixConfig,
    TokenShareMixer,
    buffer_shuffled,
    reread_source,
)


def make_mixer(share=0.9, seed=0):
    long_items = [("L", i, 500 + 37 * (i % 11)) for i in range(23)]
    short_items = [("S", i, 40 + 13 * (i % 5)) for i in range(17)]
    return TokenShareMixer(
        reread_source(long_items, len(long_items), f"{seed}:long"),
        reread_source(short_items, len(short_items), f"{seed}:short"),
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
    source = reread_source(list(range(10)), 10, "4:long")
    epoch0, epoch1 = list(source(0, 0)), list(source(1, 0))
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1
    assert list(source(1, 7)) == epoch1[7:]


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="long_share"):
        MixConfig(long_share=1.5).validate()
    empty = TokenShareMixer(reread_source([]), reread_source([1]), num_tokens=lambda x: 1)
    with pytest.raises(ValueError, match="long source yields no items"):
        next(empty)
    other = make_mixer(0.5)
    with pytest.raises(ValueError, match="long_share"):
        other.load_state_dict(make_mixer(0.9).state_dict())


@pytest.mark.parametrize("stream", ["examples", "shuffled", "mixer"])
def test_lookahead_peeks_without_consuming_and_saves_the_state_before_the_peek(stream):
    """Asynchronous rollouts read the next step's examples ahead: a :class:`Lookahead`
    yields what the bare stream yields whatever it peeks, and its state after a peek
    resumes (into a fresh stream) with the peeked items first."""
    def make():
        if stream == "mixer":
            return make_mixer()
        return ExampleStream(list(range(7)), *((7, "2:long") if stream == "shuffled" else ()))

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
    assert (ahead.long_token_share is None) == (stream != "mixer")


def test_a_full_shuffle_buffer_draws_every_permutation_equally_often():
    """The definition of a uniform shuffle: over many seeds, each of the 3! orders of three
    items appears with frequency 1/6 (binomial std 0.005 at 6000 draws; bound 4 std)."""
    draws = 6000
    counts = Counter(tuple(buffer_shuffled("abc", 3, random.Random(seed))) for seed in range(draws))
    assert set(counts) == set(itertools.permutations("abc"))
    assert all(abs(n / draws - 1 / 6) < 0.02 for n in counts.values()), counts


def test_a_small_shuffle_buffer_moves_each_item_at_most_a_buffer_earlier():
    """With ``b`` items held, the k-th output is chosen among the first k + b + 1 read, so
    item i comes out no earlier than position i - b; a buffer of 1 keeps the order."""
    items = list(range(40))
    for seed in range(20):
        order = list(buffer_shuffled(items, 4, random.Random(seed)))
        assert sorted(order) == items
        assert all(position >= item - 4 for position, item in enumerate(order))
    assert list(buffer_shuffled(items, 1, random.Random(0))) == items
    assert len({tuple(buffer_shuffled(items, 4, random.Random(s))) for s in range(20)}) == 20


def test_a_shuffled_stream_reorders_each_epoch_by_seed_and_resumes_exactly():
    items = list(range(11))
    stream = ExampleStream(items, shuffle_buffer=11, seed="0:long")
    epochs = [stream.take(11) for _ in range(3)]
    assert all(sorted(epoch) == items for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs} | {tuple(items)}) == 4  # new order each epoch
    assert ExampleStream(items, 11, "1:long").take(11) != epochs[0]  # another seed
    assert ExampleStream(items, 11, "0:long").take(33) == sum(epochs, [])  # reproducible
    assert ExampleStream(items).take(22) == items + items  # buffer 0: file order

    interrupted = ExampleStream(items, 11, "0:long")
    head = interrupted.take(15)  # one epoch and 4 of the next
    resumed = ExampleStream(items, 11, "0:long")
    resumed.load_state_dict(interrupted.state_dict())
    assert head + resumed.take(18) == sum(epochs, [])


def test_a_mixer_of_shuffled_sources_resumes_exactly():
    def make():
        return TokenShareMixer(reread_source(list(range(9)), 9, "3:long"),
                               reread_source(list(range(100, 105)), 5, "3:short"),
                               num_tokens=lambda item: 10 if item < 100 else 3,
                               config=MixConfig(long_share=0.7))

    expected = make().take(40)
    first_long = [item for item in expected if item < 100][:9]
    assert sorted(first_long) == list(range(9)) and first_long != list(range(9))
    interrupted = make()
    head = interrupted.take(17)
    resumed = make()
    resumed.load_state_dict(interrupted.state_dict())
    assert head + resumed.take(23) == expected


def test_training_reads_the_loader_in_the_configured_order(tmp_path, hf_tokenizer_dir, public_row,
                                                           write_parquet):
    """``dgrpo train``'s example stream over a real LongBlocks file: file order by default,
    a seed-specific permutation of the kept rows with ``shuffle_buffer``; a buffer of 1
    (which cannot reorder) is refused."""
    from megatron_dgrpo.data.chat import load_chat_tokenizer
    from megatron_dgrpo.data.longblocks import LongBlocksConfig
    from megatron_dgrpo.train.loop import training_examples

    tokenizer = load_chat_tokenizer(hf_tokenizer_dir)
    write_parquet(tmp_path / "rows.parquet", [public_row(i) for i in range(12)])
    file_order = [f"row-{i}" for i in range(12)]

    def ids(seed, **options):
        data = LongBlocksConfig(paths=(str(tmp_path),), split="all", **options)
        return [e.id for e in training_examples(data, None, MixConfig(), seed, tokenizer).take(12)]

    assert ids(0) == ids(1) == file_order
    shuffled = ids(0, shuffle_buffer=12)
    assert sorted(shuffled) == sorted(file_order) and shuffled != file_order
    assert ids(0, shuffle_buffer=12) == shuffled != ids(1, shuffle_buffer=12)
    for bad in (1, -1):
        with pytest.raises(ValueError, match="shuffle_buffer"):
            LongBlocksConfig(paths=(str(tmp_path),), shuffle_buffer=bad).validate()


def test_resuming_in_another_order_is_refused_and_old_checkpoints_mean_file_order():
    items = list(range(8))
    saved = ExampleStream(items, 8, "0:long")
    saved.take(3)
    for other in (ExampleStream(items), ExampleStream(items, 8, "1:long")):
        with pytest.raises(ValueError, match="shuffle_buffer"):
            other.load_state_dict(saved.state_dict())
    old = {"epoch": 0, "position": 3}  # a checkpoint from before streams recorded their order
    file_order = ExampleStream(items)
    file_order.load_state_dict(old)
    assert file_order.take(2) == [3, 4]
    with pytest.raises(ValueError, match="training data was read in the order"):
        ExampleStream(items, 8, "0:long").load_state_dict(old)

    def mixer(buffer):
        return TokenShareMixer(reread_source(items, buffer, "0:long"), reread_source(items),
                               num_tokens=lambda item: 1)

    with pytest.raises(ValueError, match="the long data"):
        mixer(0).load_state_dict(mixer(8).state_dict())
    old_mixer_state = {key: value for key, value in mixer(0).state_dict().items() if key != "order"}
    mixer(0).load_state_dict(old_mixer_state)  # file order, as before
    with pytest.raises(ValueError, match="the long data"):
        mixer(8).load_state_dict(old_mixer_state)


def test_a_checkpoint_past_the_end_of_changed_data_names_the_problem():
    saved = ExampleStream(list(range(8)), 8, "0:long")
    saved.take(6)
    with pytest.raises(ValueError, match="resumes at example 6 of epoch 0, but the data has only 4"):
        ExampleStream(list(range(4)), 8, "0:long").load_state_dict(saved.state_dict())
