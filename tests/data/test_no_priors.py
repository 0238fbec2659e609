"""The generator emits no task answerable from priors.

A no-context baseline fit on one seed's tasks and scored on another seed's must stay near the
chance level each task is built to have, while a reader with the reference answer (the document
holds it: tests/data/test_synth_tasks.py recovers every answer from the document) scores 100.
"""

import math
from collections import Counter

import pytest

from megatron_dgrpo.data.baseline import NoContextBaseline, read_fit_rows
from megatron_dgrpo.data.chat import load_chat_tokenizer
from megatron_dgrpo.data.evaluate import eval_item, evaluate
from megatron_dgrpo.data.longblocks import LongBlocksConfig, LongBlocksLoader
from megatron_dgrpo.data.rewards import RewardConfig
from megatron_dgrpo.data.synth import SynthConfig
from megatron_dgrpo.data.synth.writer import write_synth_dataset

PER_TASK = 100
LENGTHS = (128, 512)
# The best a question-only answer can do on each task, by construction of the generator:
CHANCE = {
    "multihop": 0.0,  # the answer is a fresh pseudo-name
    "list_items": 0.0,  # a set of fresh pseudo-names
    "sum_values": 0.0,  # a total of 2..5 amounts of 20..2400: thousands of values
    "counterfactual": 1 / 10,  # each subject's value is uniform over >= 10 alternatives
    "unanswerable": 1 / 3,  # the default share of absent facts; answerable ones name fresh people
    "count_items": 1 / 6,  # uniform over 2..7
    "section_lookup": 1 / 4,  # uniform over the 4 sections of every document up to 2k tokens
    "event_order": 1 / 24,  # uniform over the 4! orders
}


def upper_bound(chance: float, n: int) -> float:
    """Chance plus three binomial standard deviations at ``n`` items (and two lucky hits in 100)."""
    return chance + 3 * math.sqrt(chance * (1 - chance) / n) + 0.02


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, hf_tokenizer_dir):
    root = tmp_path_factory.mktemp("priors")
    for name, seed in (("train", 0), ("heldout", 1)):
        config = SynthConfig(num_examples=PER_TASK * len(CHANCE), lengths=LENGTHS, seed=seed,
                             tokenizer=str(hf_tokenizer_dir), filler_bank_size=2000)
        write_synth_dataset(config, root / name, shard_size=400)
    loader = LongBlocksLoader(LongBlocksConfig(paths=(str(root / "heldout"),), split="all"),
                              load_chat_tokenizer(hf_tokenizer_dir))
    return root, list(loader)


def test_no_task_has_a_dominant_answer(tasks):
    _, heldout = tasks
    by_task: dict[str, Counter] = {}
    for example in heldout:
        by_task.setdefault(example.metadata["task"], Counter())[example.reference_answer] += 1
    assert set(by_task) == set(CHANCE)
    for task, answers in by_task.items():
        top_share = answers.most_common(1)[0][1] / sum(answers.values())
        assert top_share <= upper_bound(CHANCE[task], PER_TASK), (task, answers.most_common(3))
    # documents up to 2k tokens have exactly four sections, and each is the answer about as often
    assert sorted(by_task["section_lookup"]) == ["1", "2", "3", "4"]


def test_a_no_context_baseline_fit_on_another_seed_scores_near_chance(tasks):
    root, heldout = tasks
    baseline = NoContextBaseline.fit(read_fit_rows([str(root / "train")]), fit_on="seed 0")
    assert baseline.num_examples == PER_TASK * len(CHANCE)
    scores = baseline.score([eval_item(e) for e in heldout], RewardConfig())
    per_task: dict[str, list[float]] = {}
    for scored in scores.table.scored:
        per_task.setdefault(scored.item.task, []).append(scored.score)
    for task, values in per_task.items():
        assert len(values) == PER_TASK
        assert sum(values) / len(values) <= upper_bound(CHANCE[task], PER_TASK), task
    # the baseline answers what the fit set answered most: for unanswerable, "unanswerable"
    item = next(eval_item(e) for e in heldout if e.metadata["task"] == "unanswerable")
    assert baseline.answer(item) == "unanswerable"


def test_a_reader_of_the_document_scores_100_beside_the_baseline(tasks, tmp_path):
    root, heldout = tasks
    reference = {tuple(e.prompt_ids): e.reference_answer for e in heldout}
    baseline = NoContextBaseline.fit(read_fit_rows([str(root / "train")]), fit_on="seed 0")
    table = evaluate(heldout, lambda prompts: [f"Answer: {reference[tuple(p)]}" for p in prompts],
                     out_dir=tmp_path / "report", baseline=baseline)
    assert table.score() == 100.0
    for family in table.families:
        assert table.score(family) == 100.0
        assert table.baseline.table.score(family) < 40.0, family
    markdown = (tmp_path / "report" / "scores.md").read_text()
    assert "| family | " + " | ".join(table.lengths) + " | all | baseline |" in markdown
    grounding = table.baseline.table.score("grounding")
    model_scores = " | ".join(["100.0"] * (len(table.lengths) + 1))
    assert f"| grounding | {model_scores} | {grounding:.1f} |" in markdown
    assert "fit on seed 0 (800 examples)" in markdown
    # without a fit set the held-out items are fit on themselves, leave-one-out: low as well
    in_sample = evaluate(heldout, lambda prompts: [f"Answer: {reference[tuple(p)]}" for p in prompts])
    assert "leave-one-out" in in_sample.baseline.fit_on
    for family in table.families:
        assert in_sample.baseline.table.score(family) < 40.0, family
