"""LongBench (v1 and LongBench-E) and LongBench-v2 files the user brings: loading, prompts, scoring.

**v1 / LongBench-E** (JSONL, one sample per line): ``input``, ``context``, ``answers`` (list),
``length`` (words; characters for Chinese), ``dataset`` (one of :data:`DATASET_METRIC`, a ``_e``
suffix for LongBench-E is dropped), ``language``, ``all_classes`` (list or null; required by the
classification datasets), ``_id``. The prompt is LongBench's template for the dataset
(:data:`PROMPTS`, LongBench's published prompts); a prompt over ``max_prompt_tokens`` is cut in
the middle (first and last halves kept, LongBench's rule); it is chat-formatted except for the
few-shot and code datasets (:data:`NO_CHAT`), as LongBench does. Score: the dataset's metric
(:mod:`.longbench_metrics`), the maximum over the answers, on the response's first line for
:data:`FIRST_LINE` datasets. Rows: dataset; length buckets: LongBench-E's ``0-4k``, ``4-8k``, ``8k+``.

**v2** (a JSON list, as published, or JSONL): ``_id``, ``domain``, ``sub_domain``, ``difficulty``
(easy/hard), ``length`` (short/medium/long), ``question``, ``choice_A`` .. ``choice_D``, ``answer``
(a letter), ``context``. The prompt is LongBench-v2's zero-shot template, cut in the middle like
v1, chat-formatted. Score: 1 if the letter read from ``The correct answer is (X)`` (or ``... is X``,
after removing ``*``) is the answer. Rows: ``v2:easy`` / ``v2:hard``; length buckets: short,
medium, long.

A file's version is read from its first record (``choice_A`` present: v2). Every record is checked
before anything is generated: a missing file, bad JSON or a missing / mistyped field is a
ValueError naming the file, line and field. A ``<think>...</think>`` block opening a response is
dropped before scoring (LongBench's models do not write one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .answers import strip_thinking
from .chat import ChatTokenizer
from .evaluate import NO_DEPTH, EvalItem, EvalTable
from .longbench_metrics import METRICS
from .records import field, read_records, string_list
from .suite_tables import macro_markdown, macro_summary

DATASET_METRIC = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "multifieldqa_zh": "qa_f1_zh",
    "hotpotqa": "qa_f1", "2wikimqa": "qa_f1", "musique": "qa_f1", "dureader": "rouge_zh",
    "gov_report": "rouge", "qmsum": "rouge", "multi_news": "rouge", "vcsum": "rouge_zh",
    "trec": "classification", "triviaqa": "qa_f1", "samsum": "rouge", "lsht": "classification",
    "passage_retrieval_en": "retrieval", "passage_count": "count", "passage_retrieval_zh": "retrieval_zh",
    "lcc": "code_sim", "repobench-p": "code_sim",
}
CATEGORIES = {
    "Single-Doc QA": ("narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"),
    "Multi-Doc QA": ("hotpotqa", "2wikimqa", "musique", "dureader"),
    "Summarization": ("gov_report", "qmsum", "multi_news", "vcsum"),
    "Few-shot Learning": ("trec", "triviaqa", "samsum", "lsht"),
    "Synthetic": ("passage_count", "passage_retrieval_en", "passage_retrieval_zh"),
    "Code": ("lcc", "repobench-p"),
}
NO_CHAT = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
FIRST_LINE = frozenset({"trec", "triviaqa", "samsum", "lsht"})
V2_TASK = "longbench_v2"

_PASSAGES = ("Answer the question based on the given passages. Only give me the answer and do not output "
             "any other words.")
_PASSAGES_PROMPT = (f"{_PASSAGES}\n\nThe following are given passages.\n{{context}}\n\n{_PASSAGES}\n\n"
                    "Question: {input}\nAnswer:")
_QASPER = ("as concisely as you can, using a single phrase or sentence if possible. If the question cannot be "
           "answered based on the information in the article, write \"unanswerable\". If the question is a "
           "yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.")
_NARRATIVE = "asconcisely as you can, using a single phrase if possible. Do not provide any explanation."
PROMPTS = {
    "narrativeqa": (f"You are given a story, which can be either a novel or a movie script, and a question. "
                    f"Answer the question {_NARRATIVE}\n\nStory: {{context}}\n\nNow, answer the question "
                    f"based on the story {_NARRATIVE}\n\nQuestion: {{input}}\n\nAnswer:"),
    "qasper": (f"You are given a scientific article and a question. Answer the question {_QASPER}\n\nArticle: "
               f"{{context}}\n\n Answer the question based on the above article {_QASPER}\n\nQuestion: "
               "{input}\n\nAnswer:"),
    "multifieldqa_en": ("Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
                        "question based on the above text, only give me the answer and do not output any "
                        "other words.\n\nQuestion: {input}\nAnswer:"),
    "multifieldqa_zh": ("阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，"
                        "不要输出任何其他字词。\n\n问题：{input}\n回答："),
    "hotpotqa": _PASSAGES_PROMPT,
    "2wikimqa": _PASSAGES_PROMPT,
    "musique": _PASSAGES_PROMPT,
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": ("You are given a report by a government agency. Write a one-page summary of the report.\n\n"
                   "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"),
    "qmsum": ("You are given a meeting transcript and a query containing a question or instruction. Answer the "
              "query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the "
              "above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"),
    "multi_news": ("You are given several news passages. Write a one-page summary of all news. \n\nNews:\n"
                   "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:"),
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": ("Please determine the type of the question below. Here are some examples of questions.\n\n"
             "{context}\n{input}"),
    "triviaqa": ("Answer the question based on the given passage. Only give me the answer and do not output any "
                 "other words. The following are some examples.\n\n{context}\n\n{input}"),
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": ("There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
                      "Please carefully read these paragraphs and determine how many unique paragraphs there are "
                      "after removing duplicates. In other words, how many non-repeating paragraphs are there in "
                      "total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing "
                      "duplicates. The output format should only contain the number, such as 1, 2, 3, and so "
                      "on.\n\nThe final answer is: "),
    "passage_retrieval_en": ("Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine "
                             "which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract."
                             "\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. "
                             "The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer "
                             "is: "),
    "passage_retrieval_zh": ("以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n"
                             "{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是："),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
V2_PROMPT = ("Please read the following text and answer the question below.\n\n<text>\n{context}\n</text>\n\n"
             "What is the correct answer to this question: {question}\nChoices:\n(A) {A}\n(B) {B}\n(C) {C}\n"
             "(D) {D}\n\nFormat your response as follows: \"The correct answer is (insert answer here)\".")
_V2_LETTER = (re.compile(r"The correct answer is \(([A-D])\)"), re.compile(r"The correct answer is ([A-D])"))


@dataclass(frozen=True)
class LongBenchItem(EvalItem):
    """An item with everything its metric needs: every answer and the dataset's classes."""

    answers: tuple[str, ...] = ()
    all_classes: tuple[str, ...] = ()


def truncate_middle(text: str, tokenizer: ChatTokenizer, max_tokens: int) -> str:
    """``text`` cut to its first and last ``max_tokens // 2`` tokens if it is longer than ``max_tokens``."""
    ids = tokenizer.encode_plain(text)  # document content: control-token literals stay text
    if len(ids) <= max_tokens:
        return text
    half = max_tokens // 2
    return tokenizer.decode(ids[:half]) + tokenizer.decode(ids[-half:])


def length_bucket(length: int) -> str:
    """LongBench-E's buckets of the ``length`` field."""
    return "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"


def _v1_item(where: str, record: dict, tokenizer: ChatTokenizer, max_prompt_tokens: int) -> LongBenchItem:
    dataset = field(record, "dataset", str, where)
    name = dataset[:-2] if dataset.endswith("_e") else dataset
    if name not in DATASET_METRIC:
        raise ValueError(f"{where}: field 'dataset' = {dataset!r} is not a LongBench dataset; known: "
                         f"{', '.join(DATASET_METRIC)}")
    context = record.get("context")
    if not isinstance(context, str):
        raise ValueError(f"{where}: field 'context' must be a string")
    query = record.get("input")
    if not isinstance(query, str):
        raise ValueError(f"{where}: field 'input' must be a string")
    answers = string_list(record, "answers", where)
    if not answers:
        raise ValueError(f"{where}: field 'answers' is empty")
    classes = string_list(record, "all_classes", where, optional=True) or ()
    if DATASET_METRIC[name] == "classification" and not classes:
        raise ValueError(f"{where}: field 'all_classes' is needed by the classification dataset {name}")
    length = field(record, "length", int, where)
    field(record, "language", str, where)
    prompt = truncate_middle(PROMPTS[name].format(context=context, input=query), tokenizer, max_prompt_tokens)
    return LongBenchItem(
        id=str(field(record, "_id", str, where)),
        prompt_ids=tuple(tokenizer.encode_plain(prompt) if name in NO_CHAT else tokenizer.prompt_ids(prompt)),
        reference=answers[0], task=name, family=name, length_bucket=length_bucket(length), depth=NO_DEPTH,
        answers=answers, all_classes=classes)


def _v2_item(where: str, record: dict, tokenizer: ChatTokenizer, max_prompt_tokens: int) -> LongBenchItem:
    text = {name: field(record, name, str, where).strip()
            for name in ("_id", "domain", "sub_domain", "question", "context", "choice_A", "choice_B",
                         "choice_C", "choice_D")}
    checks = {"difficulty": ("easy", "hard"), "length": ("short", "medium", "long"), "answer": tuple("ABCD")}
    value = {}
    for name, allowed in checks.items():
        value[name] = field(record, name, str, where)
        if value[name] not in allowed:
            raise ValueError(f"{where}: field {name!r} must be one of {allowed}, got {value[name]!r}")
    prompt = V2_PROMPT.format(context=text["context"], question=text["question"], A=text["choice_A"],
                              B=text["choice_B"], C=text["choice_C"], D=text["choice_D"])
    return LongBenchItem(
        id=text["_id"],
        prompt_ids=tuple(tokenizer.prompt_ids(truncate_middle(prompt, tokenizer, max_prompt_tokens))),
        reference=value["answer"], task=V2_TASK, family=f"v2:{value['difficulty']}",
        length_bucket=value["length"], depth=NO_DEPTH, answers=(value["answer"],))


def load_longbench(paths: list[str] | tuple[str, ...], tokenizer: ChatTokenizer,
                   max_prompt_tokens: int = 131072) -> list[LongBenchItem]:
    """Every sample of the files (v1 or v2 per file), checked and prompted (see the module docstring)."""
    if max_prompt_tokens < 2:
        raise ValueError(f"max_prompt_tokens must be >= 2, got {max_prompt_tokens}")
    items: list[LongBenchItem] = []
    for path in paths:
        records = read_records(path)
        make = _v2_item if "choice_A" in records[0][1] else _v1_item
        items += [make(where, record, tokenizer, max_prompt_tokens) for where, record in records]
    return items


def v2_choice(response: str) -> str | None:
    """The letter LongBench-v2 reads from a response, or None."""
    response = strip_thinking(response).replace("*", "")
    for pattern in _V2_LETTER:
        match = pattern.search(response)
        if match:
            return match.group(1)
    return None


def longbench_score(item: LongBenchItem, response: str) -> float:
    """The item's LongBench score in [0, 1] (see the module docstring)."""
    if item.task == V2_TASK:
        return float(v2_choice(response) == item.reference)
    prediction = strip_thinking(response)
    if item.task in FIRST_LINE:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = METRICS[DATASET_METRIC[item.task]]
    return max(metric(prediction, answer, item.all_classes) for answer in item.answers)


def _v2_row(table: EvalTable) -> str:
    scored = [s for s in table.scored if s.item.task == V2_TASK]
    if not scored:
        return ""
    columns = {"Overall": lambda s: True, "Easy": lambda s: s.item.family == "v2:easy",
               "Hard": lambda s: s.item.family == "v2:hard", "Short": lambda s: s.item.length_bucket == "short",
               "Medium": lambda s: s.item.length_bucket == "medium", "Long": lambda s: s.item.length_bucket == "long"}
    cells = []
    for keep in columns.values():
        chosen = [s.score for s in scored if keep(s)]
        cells.append(f"{100 * sum(chosen) / len(chosen):.1f}" if chosen else "-")
    return ("### LongBench-v2 (accuracy x 100)\n\n| " + " | ".join(columns) + " |\n"
            + "|---:" * len(columns) + "|\n| " + " | ".join(cells) + " |\n")


def longbench_files(table: EvalTable) -> dict[str, str]:
    """``longbench.md`` (v1: dataset x length bucket with category and overall macro averages, as
    LongBench reports; v2: its Overall / Easy / Hard / Short / Medium / Long row) and ``longbench.json``."""
    summary = macro_summary(table, tuple(DATASET_METRIC), CATEGORIES, only=tuple(DATASET_METRIC))
    parts = []
    if summary.rows:
        parts.append(macro_markdown(summary, "LongBench: score by dataset (x 100; averages over datasets)",
                                    row_title="dataset"))
    parts.append(_v2_row(table))
    return {"longbench.md": "\n".join(p for p in parts if p), "longbench.json": summary.to_json()}
