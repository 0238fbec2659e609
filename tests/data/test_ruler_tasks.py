"""RULER task generation rules pinned on small cases (approximate token counter unless stated).

Independent checks: needles, chains and word counts are parsed back out of the generated text
with plain regular expressions and compared with the published rules; depths are recounted with
the approximate counter; zeta against closed forms.
"""

import math
import re
from collections import Counter

import pytest

from megatron_dgrpo.data.ruler import RulerConfig, RulerGenerator
from megatron_dgrpo.data.ruler.aggregation import FWE_PREAMBLE, zeta
from megatron_dgrpo.data.ruler.haystack import NOISE, RULER_DEPTHS, fit_units
from megatron_dgrpo.data.ruler.niah import NIAH_TASKS
from megatron_dgrpo.data.synth.length import ApproxTokenCounter

NEEDLE = re.compile(r"One of the special magic (numbers|uuids|words) for (\S+) is: (\S+)\.")
COUNTER = ApproxTokenCounter()
VALUE_PATTERNS = {"numbers": r"[1-9]\d{6}", "words": r"[a-z]+-[a-z]+",
                  "uuids": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"}


@pytest.fixture(scope="module")
def generator():
    return RulerGenerator(RulerConfig(lengths=(2048, 8192), num_per_task=3, seed=5))


def _needles(text):
    found = {}
    for _, key, value in NEEDLE.findall(text):
        found.setdefault(key, []).append(value)
    return found


@pytest.mark.parametrize("task", NIAH_TASKS, ids=lambda t: t.name)
def test_niah_needles_keys_values_and_queries(generator, task):
    for index in range(3):
        example = generator.example(task.name, 2048, index)
        needles = _needles(example.document)
        queried = re.search(r"for (.+) mentioned in the provided text\?$", example.question).group(1)
        queried_keys = re.split(r", and |, ", queried)
        assert len(queried_keys) == task.num_queries
        num_keys = max(task.num_keys, task.num_queries)
        real = {k: v for k, v in needles.items() if all(example.document.count(x) == 1 for x in v)}
        if task.haystack == "needle":  # look-alikes: one value each, never a real key
            real = {k: needles[k] for k in queried_keys}
            assert sum(len(v) for v in needles.values()) > 10 * num_keys
        else:
            assert len(needles) == num_keys and all(len(v) == task.num_values for v in needles.values())
        assert all(len(needles[k]) == task.num_values for k in queried_keys)
        # values of the queried keys, key by key in query order (a key's values in any order)
        per_key = [example.references[j * task.num_values:(j + 1) * task.num_values] for j in range(len(queried_keys))]
        assert [sorted(v) for v in per_key] == [sorted(real[k]) for k in queried_keys]
        assert len(example.references) == task.num_queries * task.num_values
        for value in example.references:
            assert example.document.count(value) == 1
            assert re.fullmatch(VALUE_PATTERNS[task.value_kind], value)
        assert example.answer == "\n".join(example.references)
        singular = len(example.references) == 1
        assert example.question.startswith("What is the special magic" if singular else "What are all the special magic")
        assert example.document.startswith("A special magic" if singular else "Some special magic")
        assert example.needle_depth_target in RULER_DEPTHS
        if task.haystack == "noise":
            context = example.document.split("\n")[1:]
            assert all(line == NOISE or NEEDLE.fullmatch(line) for line in context)


def test_configured_depths_place_the_queried_needle(tmp_path):
    generator = RulerGenerator(RulerConfig(lengths=(4096,), num_per_task=3, depths=(0.0, 0.5, 1.0),
                                           tasks=("niah_single_2", "niah_multikey_1")))
    for task in ("niah_single_2", "niah_multikey_1"):
        for index, depth in enumerate((0.0, 0.5, 1.0)):
            example = generator.example(task, 4096, index)
            context = example.document.split("\n", 1)[1]
            needle = next(m.group(0) for m in NEEDLE.finditer(context) if m.group(3) == example.references[0])
            before = context[:context.index(needle)]
            recounted = COUNTER.count(before) / (COUNTER.count(context) - COUNTER.count(needle))
            assert example.needle_depth_target == depth
            assert example.needle_depths[0] == pytest.approx(recounted, abs=1e-12)
            assert abs(recounted - depth) < 0.02  # within one ~25-token sentence of 4K
            if depth == 0.0:
                assert context.startswith(needle)
            if depth == 1.0:
                assert context.endswith(needle)


def test_length_rule_prompt_plus_generation_fits_the_target(generator):
    for length in (2048, 8192):
        for task in generator.tasks:
            for index in range(3):
                example = generator.example(task, length, index)
                message = f"{example.document}\n\n{example.question}"
                assert example.num_tokens == COUNTER.count(message)
                assert example.num_tokens + example.max_new_tokens <= length
                assert example.num_tokens + example.max_new_tokens >= 0.93 * length, (task, length)
                assert example.target_tokens == length and example.length_bucket == f"{length // 1024}k"


def test_length_rule_with_the_model_tokenizer(hf_tokenizer_dir):
    from megatron_dgrpo.data.chat import load_chat_tokenizer

    tokenizer = load_chat_tokenizer(hf_tokenizer_dir)
    generator = RulerGenerator(RulerConfig(lengths=(8192,), num_per_task=2, tokenizer=str(hf_tokenizer_dir),
                                           tasks=("niah_single_1", "niah_multivalue", "vt")))
    for task in generator.tasks:
        for index in range(2):
            example = generator.example(task, 8192, index)
            prompt = tokenizer.render_prompt(f"{example.document}\n\n{example.question}")
            assert example.num_tokens == len(tokenizer.encode(prompt))
            assert 0.95 * 8192 <= example.num_tokens + example.max_new_tokens <= 8192


def test_same_config_same_examples_other_seed_other_examples():
    def first(seed):
        generator = RulerGenerator(RulerConfig(lengths=(2048,), num_per_task=2, seed=seed, tasks=("niah_multiquery", "cwe")))
        return [generator.example(t, 2048, i) for t in generator.tasks for i in range(2)]

    assert first(1) == first(1)
    assert [e.document for e in first(1)] != [e.document for e in first(2)]


def _resolve(statements):
    """Variable -> value, following `VAR B = VAR A` back to `VAR A = <number>`."""
    values = {}
    for target, source in statements:
        values[target] = int(source) if source.isdigit() else values[source]
    return values


@pytest.mark.parametrize("chains", [1, 3])
def test_variable_tracking_chains_resolve_to_the_references(chains):
    from megatron_dgrpo.data.ruler.variable_tracking import PREAMBLE, VariableTrackingTask

    generator = RulerGenerator(RulerConfig(lengths=(4096,), num_per_task=2, tasks=("vt",)))
    generator.tasks["vt"] = VariableTrackingTask(num_chains=chains, num_hops=4)
    for index in range(2):
        example = generator.example("vt", 4096, index)
        example_part, task_part = example.document.split(f"\n\n{PREAMBLE}\n\n")
        statements = re.findall(r"^VAR ([A-Z]{5}) = (?:VAR )?([A-Z]{5}|\d{5})$", task_part, re.MULTILINE)
        assert len(statements) == chains * 5
        values = _resolve(statements)  # raises KeyError if a statement came before its source
        asked = int(re.search(r"assigned the value (\d{5}) in the text", example.question).group(1))
        assert sorted(v for v, value in values.items() if value == asked) == sorted(example.references)
        assert len(example.references) == 5 and example.hops == 4
        assert len(set(values.values())) == chains
        shown = re.search(r"they are: ((?:[A-Z]{5} ?){5})$", example_part).group(1).split()
        example_values = _resolve(re.findall(r"^VAR ([A-Z]{5}) = (?:VAR )?([A-Z]{5}|\d{5})$", example_part, re.MULTILINE))
        assert len(set(example_values[v] for v in shown)) == 1 and not set(shown) & set(values)
        assert all(line == NOISE for line in task_part.splitlines() if not line.startswith("VAR "))


@pytest.mark.parametrize("length,common,uncommon", [(2048, 6, 1), (8192, 30, 3)])
def test_common_words_counts(length, common, uncommon):
    generator = RulerGenerator(RulerConfig(lengths=(length,), num_per_task=2, tasks=("cwe",)))
    for index in range(2):
        example = generator.example("cwe", length, index)
        shot, listing = example.document.split("\n\n")
        entries = re.findall(r"(\d+)\. ([a-z]+)", listing)
        assert [int(n) for n, _ in entries] == list(range(1, len(entries) + 1))
        counts = Counter(w for _, w in entries)
        assert sorted(w for w, c in counts.items() if c == common) == sorted(example.references)
        assert len(example.references) == 10
        assert set(counts.values()) == {common, uncommon}
        shot_words = set(re.findall(r"\d+\. ([a-z]+)", shot))
        assert not shot_words & set(counts)
        assert example.question == "Question: What are the 10 most common words in the above list?"


def test_frequent_words_follow_zipf():
    generator = RulerGenerator(RulerConfig(lengths=(8192,), num_per_task=2, tasks=("fwe",)))
    for index in range(2):
        example = generator.example("fwe", 8192, index)
        assert example.document.startswith(FWE_PREAMBLE + " ")
        words = example.document[len(FWE_PREAMBLE) + 1:].split(" ")
        counts = Counter(words)
        ranked = [w for w, _ in counts.most_common()]
        assert ranked[0] == "..." and ranked[1:4] == example.references
        assert counts[ranked[3]] > counts[ranked[4]]
        # some text size N gives every present word of rank k exactly floor(N k^-2 / zeta(2)) copies
        observed = [counts[w] for w in ranked]
        z = math.pi ** 2 / 6
        sizes = [n for n in range(math.ceil(observed[0] * z), math.ceil((observed[0] + 1) * z))
                 if [int(n * k ** -2 / z) for k in range(1, len(observed) + 1)] == observed]
        assert sizes
        assert all(re.fullmatch(r"[a-z]{6}", w) for w in ranked[1:])


def test_zeta_matches_closed_forms():
    assert zeta(2.0) == pytest.approx(math.pi ** 2 / 6, abs=1e-12)
    assert zeta(4.0) == pytest.approx(math.pi ** 4 / 90, abs=1e-12)
    assert zeta(3.0) == pytest.approx(1.2020569031595942, abs=1e-12)
    with pytest.raises(ValueError, match="alpha > 1"):
        zeta(1.0)


def test_fit_units_finds_the_largest_fitting_count():
    measure = lambda n: 10 + 3 * n  # noqa: E731
    for guess in (1, 29, 30, 31, 500):
        assert fit_units(measure, 100, guess) == 30
    assert fit_units(lambda n: 10 + 3 * n + (n % 7 == 3), 100, 10) == 30
    with pytest.raises(ValueError, match="exceed the budget of 5 tokens"):
        fit_units(measure, 5, 1, what="x")


def test_too_short_a_length_is_refused_before_generation(tmp_path):
    from megatron_dgrpo.data.ruler.writer import write_ruler_suite

    with pytest.raises(ValueError, match="ruler task niah_multikey_1 at 256 tokens: .* exceed the budget of 128 tokens"):
        write_ruler_suite(RulerConfig(lengths=(256,), num_per_task=1), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,message", [
    ({"lengths": (64,)}, "ruler.lengths"),
    ({"num_per_task": 0}, "ruler.num_per_task"),
    ({"tasks": ("niah_single_9",)}, "unknown task"),
    ({"tasks": ("qa_1",)}, "need their QA file"),
    ({"depths": (1.5,)}, "ruler.depths"),
    ({"tokenizer": "/no/such/tokenizer"}, "ruler.tokenizer"),
])
def test_bad_config_names_the_option(change, message):
    with pytest.raises(ValueError, match=message):
        RulerConfig(**change).validate()
