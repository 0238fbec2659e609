"""Synthetic tasks: answers recovered by independent checkers, needle depths, lengths, determinism."""

import re

import pytest

from megatron_dgrpo.data.synth import (
    ApproxTokenCounter,
    SynthConfig,
    SynthGenerator,
    TokenizerCounter,
    parse_length,
    resolve_tasks,
)
from megatron_dgrpo.data.synth.tasks.grounding import COMMON_FACTS

NAME = r"[A-Z][a-z]+ [A-Z][a-z]+"
FACT_PATTERNS = (  # the three paraphrases, as (regex, group of subject, relation, object)
    (re.compile(rf"The ([a-z]+) of ({NAME}) is ({NAME})\."), (2, 1, 3)),
    (re.compile(rf"({NAME}) is the ([a-z]+) of ({NAME})\."), (3, 2, 1)),
    (re.compile(rf"For ({NAME}), the ([a-z]+) is ({NAME})\."), (1, 2, 3)),
)
ALL_TASKS = resolve_tasks(["multihop", "grounding", "synthesis", "document"])


@pytest.fixture(scope="module")
def generator():
    config = SynthConfig(lengths=(1024, 2048), depths=(0.0, 0.3, 0.7, 1.0), seed=7, filler_bank_size=2000)
    return SynthGenerator(config)


@pytest.fixture(scope="module")
def examples(generator):
    return [generator.example(i) for i in range(len(ALL_TASKS) * 2 * 4 * 4)]  # the grid, hops 1..4


def parse_facts(document: str) -> dict[tuple[str, str], str]:
    facts: dict[tuple[str, str], str] = {}
    for pattern, (s, r, o) in FACT_PATTERNS:
        for match in pattern.finditer(document):
            key = (match.group(s), match.group(r))
            assert facts.get(key, match.group(o)) == match.group(o), f"conflicting facts for {key}"
            facts[key] = match.group(o)
    return facts


def check_multihop(ex):
    facts = parse_facts(ex.document)
    phrase, start = re.fullmatch(rf"Who is (.*) of ({NAME})\?", ex.question).groups()
    relations = re.findall(r"the ([a-z]+)", phrase)[::-1]
    assert len(relations) == ex.hops
    entity = start
    for relation in relations:
        entity = facts[(entity, relation)]
    assert entity == ex.answer
    # distractors share entities: the start person has a fact with a relation off the chain
    assert any(subject == start and relation != relations[0] for subject, relation in facts)
    assert len(facts) > 2 * ex.hops


def check_counterfactual(ex):
    subject = re.fullmatch(r"According to the document, what is (.*)\?", ex.question).group(1)
    values = re.findall(rf"{re.escape(subject)} is (.+?)\.", ex.document)
    assert values == [ex.answer]
    truth = {s: t for s, t, _ in COMMON_FACTS}[subject]
    assert ex.answer != truth
    assert sum(ex.document.count(s) for s, _, _ in COMMON_FACTS) > 1  # decoy statements present


def check_unanswerable(ex):
    relation, person = re.fullmatch(rf"Who is the ([a-z]+) of ({NAME})\?", ex.question).groups()
    facts = parse_facts(ex.document)
    assert facts.get((person, relation), "unanswerable") == ex.answer
    assert sum(subject == person for subject, _ in facts) == 2  # answerable or not, the same shape
    assert any(r == relation and s != person for s, r in facts)  # the relation word gives nothing away


def items_of(document: str, kind: str) -> list[str]:
    return re.findall(rf"a {kind} (?:called|named|known as) ({NAME})\.", document)


def check_list_items(ex):
    kind = re.fullmatch(
        r"List every ([a-z]+) named in the document, separated by semicolons\.", ex.question
    ).group(1)
    assert set(items_of(ex.document, kind)) == set(ex.answer.split("; "))


def check_count_items(ex):
    kind = re.fullmatch(r"How many different ([a-z]+)s are named in the document\?", ex.question).group(1)
    assert len(set(items_of(ex.document, kind))) == int(ex.answer)


def check_sum_values(ex):
    good, guild = re.fullmatch(
        r"In total, how many crates of (.+) did the (\w+) guild deliver\?", ex.question
    ).groups()
    amounts = re.findall(
        rf"[Tt]he {guild} guild delivered ([\d,]+) crates of {re.escape(good)}[ .]", ex.document
    )
    assert amounts and sum(int(a.replace(",", "")) for a in amounts) == int(ex.answer)


def check_section_lookup(ex):
    fact = re.fullmatch(
        r"Which section of the document states that the (.+)\? Give the section number\.", ex.question
    ).group(1)
    position = ex.document.index(f"The {fact}.")
    assert ex.document.count(f"The {fact}.") == 1
    sections = re.findall(r"^## Section (\d+)\b", ex.document[:position], flags=re.MULTILINE)
    assert sections[-1] == ex.answer


def check_event_order(ex):
    clauses = re.findall(r"\(\d\) ([^;]+?)(?:;|\. Give)", ex.question)
    assert len(clauses) == 4
    years = [int(re.search(rf"In (\d{{4}}), {re.escape(c)}\.", ex.document).group(1)) for c in clauses]
    expected = sorted(range(4), key=lambda i: years[i])
    assert ex.answer == ", ".join(str(i + 1) for i in expected)


CHECKERS = {
    "multihop": check_multihop,
    "counterfactual": check_counterfactual,
    "unanswerable": check_unanswerable,
    "list_items": check_list_items,
    "count_items": check_count_items,
    "sum_values": check_sum_values,
    "section_lookup": check_section_lookup,
    "event_order": check_event_order,
}


def test_every_task_is_checked():
    assert set(CHECKERS) == set(ALL_TASKS)


def test_recorded_answers_are_recoverable_from_the_documents(examples):
    seen = set()
    for ex in examples:
        CHECKERS[ex.task](ex)
        seen.add((ex.task, ex.length_bucket, ex.needle_depth_target))
    # every grid cell is filled; section_lookup places its fact by section, not by the depth grid
    gridded = {cell for cell in seen if cell[0] != "section_lookup"}
    assert len(gridded) == (len(ALL_TASKS) - 1) * 2 * 4
    assert {ex.hops for ex in examples if ex.task == "multihop"} == {1, 2, 3, 4}
    assert {ex.answer for ex in examples if ex.task == "unanswerable"} & {"unanswerable"}
    assert {ex.answer for ex in examples if ex.task == "unanswerable"} - {"unanswerable"}


def primary_needle(ex) -> str:
    """The needle the controlled depth applies to, found independently of the generator."""
    if ex.task == "multihop":
        facts = [m.group(0) for pattern, _ in FACT_PATTERNS for m in pattern.finditer(ex.document)]
        return next(f for f in facts if f.startswith(ex.answer + " is the") or f.endswith(f" {ex.answer}."))
    if ex.task == "counterfactual":
        subject = re.fullmatch(r"According to the document, what is (.*)\?", ex.question).group(1)
        return re.search(rf"[^.\n]*{re.escape(f'{subject} is {ex.answer}.')}", ex.document).group(0).strip()
    fact = re.fullmatch(r"Which section .* states that the (.+)\? Give.*", ex.question).group(1)
    return f"The {fact}."


def test_needle_depth_recorded_matches_actual_position(examples):
    counter = ApproxTokenCounter()
    checked = 0
    for ex in examples:
        if ex.task not in ("multihop", "counterfactual", "section_lookup"):
            continue
        needle = primary_needle(ex)
        position = ex.document.index(needle)
        total = counter.count(ex.document)
        actual = counter.count(ex.document[:position]) / (total - counter.count(needle))
        assert ex.needle_depth == pytest.approx(actual, abs=1e-9)
        assert ex.needle_depths[0] == ex.needle_depth
        if ex.task == "section_lookup":  # the target recorded is the configured depth nearest the fact
            nearest = min((0.0, 0.3, 0.7, 1.0), key=lambda d: abs(d - actual))
            assert ex.needle_depth_target == nearest
        else:
            assert abs(ex.needle_depth - ex.needle_depth_target) <= 60 / total  # within ~one sentence
        checked += 1
    assert checked == 3 * 2 * 4 * 4


def test_lengths_hit_the_target(examples):
    counter = ApproxTokenCounter()
    for ex in examples:
        assert ex.num_tokens == counter.count(ex.document)
        assert abs(ex.num_tokens - ex.target_tokens) <= 30  # nearest whole filler sentence (<= 60 tokens)
        assert ex.length_bucket == {1024: "1k", 2048: "2k"}[ex.target_tokens]


def test_generation_is_deterministic_and_independent_of_the_run_size(generator, examples):
    again = SynthGenerator(
        SynthConfig(
            lengths=(1024, 2048), depths=(0.0, 0.3, 0.7, 1.0), seed=7, filler_bank_size=2000, num_examples=3
        )
    )
    assert [again.example(i) for i in (5, 17, 40)] == [examples[i] for i in (5, 17, 40)]
    other_seed = SynthGenerator(
        SynthConfig(lengths=(1024, 2048), depths=(0.0, 0.3, 0.7, 1.0), seed=8, filler_bank_size=2000)
    )
    assert other_seed.example(5).document != examples[5].document


def test_filler_varies_across_documents(examples):
    sentences = [s for ex in examples[:20] for s in ex.document.split(". ")]
    assert len(set(sentences)) > 0.8 * len(sentences)


@pytest.mark.parametrize("kind", ["hf", "sentencepiece"])
def test_lengths_in_tokens_of_a_real_tokenizer(kind, hf_tokenizer_dir, sp_model_path):
    from megatron_dgrpo.data.chat import load_chat_tokenizer

    path = str(hf_tokenizer_dir if kind == "hf" else sp_model_path)
    generator = SynthGenerator(SynthConfig(lengths=(1024,), seed=1, tokenizer=path, filler_bank_size=500))
    tokenizer = load_chat_tokenizer(path)
    assert isinstance(generator.counter, TokenizerCounter)
    for index in range(0, 16, 3):
        ex = generator.example(index)
        assert ex.num_tokens == len(tokenizer.encode(ex.document))  # measured, not summed
        assert abs(ex.num_tokens - 1024) <= 0.15 * 1024
        assert ex.length_bucket == "1k"
        assert ex.token_counter == f"tokenizer:{path}"


def test_parse_length_and_config_validation():
    assert [parse_length(x) for x in ("1k", "16K", "3000", "1m")] == [1024, 16384, 3000, 1 << 20]
    with pytest.raises(ValueError, match="length"):
        parse_length("4kb")
    with pytest.raises(ValueError, match="unknown task 'riddles'"):
        SynthConfig(tasks=("riddles",)).validate()
    with pytest.raises(ValueError, match="depths"):
        SynthConfig(depths=(1.5,)).validate()
    with pytest.raises(ValueError, match="hops"):
        SynthConfig(hops=(5,)).validate()
    assert resolve_tasks(["grounding", "multihop", "counterfactual"]) == (
        "counterfactual",
        "unanswerable",
        "multihop",
    )
