"""The copy curriculum (data.synth.copy_curriculum): the second half of every document is the
first half, the names are fresh within a document, and the data loads as LongBlocks rows."""

import re

import pytest

from megatron_dgrpo.data.chat import load_chat_tokenizer
from megatron_dgrpo.data.longblocks import LongBlocksConfig, LongBlocksLoader
from megatron_dgrpo.data.synth.copy_curriculum import copy_rows, write_copy_dataset
from megatron_dgrpo.outputs import OutputExistsError

NAME = re.compile(r"^[A-Z][a-z]+ [A-Z][a-z]+$")


def halves(document: str) -> tuple[list[str], list[str]]:
    listed, recap = document.split(".\n\nRecap: ")
    assert recap.endswith(".")
    return listed.split(", "), recap[:-1].split(", ")


def test_every_recap_repeats_its_list_of_fresh_names():
    rows = copy_rows(50, seed=3, names_per_document=30)
    for row in rows:
        first, second = halves(row["document"])
        assert first == second
        assert len(first) == 30 and len(set(first)) == 30
        assert all(NAME.match(name) for name in first)
    lists = [tuple(halves(row["document"])[0]) for row in rows]
    assert len(set(lists)) == len(lists)  # no document repeats another
    assert len({row["id"] for row in rows}) == len(rows)


def test_same_seed_same_documents_other_seed_others():
    assert copy_rows(5, 7, 4) == copy_rows(5, 7, 4)
    documents = [[row["document"] for row in copy_rows(5, seed, 4)] for seed in (7, 8)]
    assert documents[0] != documents[1]


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="at least one document"):
        copy_rows(0, 0, 3)
    with pytest.raises(ValueError, match="at least one name"):
        copy_rows(3, 0, 0)


def test_written_dataset_loads_and_is_never_overwritten(tmp_path, hf_tokenizer_dir):
    out = write_copy_dataset(tmp_path / "copy", 20, seed=0, names_per_document=5)
    loader = LongBlocksLoader(LongBlocksConfig(paths=(str(out),), split="all",
                                               answer_instruction=False),
                              load_chat_tokenizer(hf_tokenizer_dir))
    loaded = {example.id: example.user_message for example in loader}
    rows = copy_rows(20, 0, 5)
    assert sorted(loaded) == sorted(row["id"] for row in rows)
    assert all(row["document"] in loaded[row["id"]] for row in rows)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(OutputExistsError):
        write_copy_dataset(out, 20, seed=1, names_per_document=5)
    assert sorted(p.name for p in out.iterdir()) == before
