"""QA over a given context (RULER's ``qa_1`` on SQuAD, ``qa_2`` on HotpotQA), from files the user brings.

Files, as RULER reads them: SQuAD 2.0 JSON (``{"data": [{"paragraphs": [{"context", "qas":
[{"question", "answers": [{"text"}], "is_impossible"}]}]}]}``; impossible questions are left out)
and the HotpotQA distractor JSON (``[{"question", "answer", "context": [[title, [sentences]]]}]``,
a document being ``title + "\\n" + "".join(sentences)``).

Rules: a sample is one question; its gold documents (SQuAD: its paragraph; HotpotQA: all ten of its
paragraphs) come with distractors, first the other paragraphs of the same SQuAD article, then
random documents of the file, up to the number that fits the length (all documents repeated when
more are needed), in random order, each shown as ``Document i:\\n<text>``. References: the
question's answers (RULER scores QA by ``string_match_part``: any one suffices).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..records import field as _field
from .spec import Rendered, TaskContext

PREAMBLE = ("Answer the question based on the given documents. Only give me the answer and do not output "
            "any other words.")
QA_FORMATS = ("squad", "hotpotqa")


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...]
    gold: tuple[int, ...]  # document indices
    related: tuple[int, ...] = ()  # same-article paragraphs (SQuAD)


@dataclass(frozen=True)
class QADataset:
    documents: tuple[str, ...]
    questions: tuple[Question, ...]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _read_json(path: str | Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"QA file {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"QA file {path} is not valid JSON: {error}") from None


def load_squad(path: str | Path) -> QADataset:
    """Questions and paragraphs of a SQuAD 2.0 file (answerable questions only)."""
    data = _field(_read_json(path), "data", list, str(path))
    documents: dict[str, int] = {}
    questions: list[Question] = []
    for a, article in enumerate(data):
        paragraphs = _field(article, "paragraphs", list, f"{path}: data[{a}]")
        ids = []
        for p, paragraph in enumerate(paragraphs):
            text = _field(paragraph, "context", str, f"{path}: data[{a}].paragraphs[{p}]")
            ids.append(documents.setdefault(text, len(documents)))
        for p, paragraph in enumerate(paragraphs):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            for q, qa in enumerate(_field(paragraph, "qas", list, where)):
                if not isinstance(qa, dict):
                    raise ValueError(f"{where}.qas[{q}] must be an object")
                if qa.get("is_impossible"):
                    continue
                answers = _field(qa, "answers", list, f"{where}.qas[{q}]")
                texts = tuple(dict.fromkeys(
                    _one_line(_field(x, "text", str, f"{where}.qas[{q}].answers")) for x in answers))
                if texts and all(texts):
                    questions.append(Question(_one_line(_field(qa, "question", str, f"{where}.qas[{q}]")),
                                              texts, (ids[p],), tuple(i for i in ids if i != ids[p])))
    return _dataset(path, documents, questions)


def load_hotpotqa(path: str | Path) -> QADataset:
    """Questions and paragraphs of a HotpotQA (distractor setting) file."""
    records = _read_json(path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: a HotpotQA file is a JSON list of questions")
    documents: dict[str, int] = {}
    questions: list[Question] = []
    for r, record in enumerate(records):
        where = f"{path}: [{r}]"
        gold = []
        for c, entry in enumerate(_field(record, "context", list, where)):
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                    and isinstance(entry[1], list) and all(isinstance(s, str) for s in entry[1])):
                raise ValueError(f"{where}.context[{c}] must be [title, [sentences]]")
            gold.append(documents.setdefault(f"{entry[0]}\n{''.join(entry[1])}", len(documents)))
        answer = _one_line(_field(record, "answer", str, where))
        if answer:
            questions.append(Question(_one_line(_field(record, "question", str, where)), (answer,),
                                      tuple(dict.fromkeys(gold))))
    return _dataset(path, documents, questions)


def _dataset(path, documents: dict[str, int], questions: list[Question]) -> QADataset:
    if not questions:
        raise ValueError(f"QA file {path} has no answerable question")
    return QADataset(tuple(documents), tuple(questions))


LOADERS = {"squad": load_squad, "hotpotqa": load_hotpotqa}


@dataclass(frozen=True)
class QATask:
    name: str
    dataset: QADataset
    tokens_to_generate: int = 32

    def instance(self, context: TaskContext) -> "QAInstance":
        return QAInstance(self, context)


class QAInstance:
    """One QA sample: a random question of the file with its documents (see the module docstring)."""

    def __init__(self, task: QATask, context: TaskContext) -> None:
        data, rng = task.dataset, context.rng
        self.seed, self.data = context.seed, data
        self.question = data.questions[rng.randrange(len(data.questions))]
        first = set(self.question.gold) | set(self.question.related)
        related = list(self.question.related)
        rng.shuffle(related)
        others = [i for i in range(len(data.documents)) if i not in first]
        rng.shuffle(others)
        self.order = list(self.question.gold) + related + others
        self.min_units = len(self.question.gold)
        self._counter = context.counter

    def tokens_per_unit(self) -> float:
        sample = [self.data.documents[i] for i in self.order[:16]]
        return sum(self._counter.count(f"Document 1:\n{d}") for d in sample) / len(sample) + 1

    def render(self, n: int) -> Rendered:
        chosen = [self.order[i % len(self.order)] for i in range(n)]
        random.Random(f"qa:{self.seed}:{n}").shuffle(chosen)
        context = "\n\n".join(f"Document {i + 1}:\n{self.data.documents[d]}" for i, d in enumerate(chosen))
        return Rendered(
            document=f"{PREAMBLE}\n\nThe following are given documents.\n\n{context}\n\n{PREAMBLE}",
            question=f"Question: {self.question.question}",
            references=self.question.answers,
        )
