"""LongBench's per-task metrics, as its evaluation script defines them (each a float in [0, 1]).

``metric(prediction, ground_truth, all_classes)``; a sample scores the maximum over its answers.

============== ==================================================================================
qa_f1          token F1 after LongBench's English normalization (lower case, ASCII punctuation
               dropped, articles a/an/the dropped, whitespace collapsed; tokens split on spaces)
qa_f1_zh       token F1 over jieba words, each lower-cased with Chinese and ASCII punctuation and
               whitespace removed (empty words dropped)
rouge          ROUGE-L F of the ``rouge`` package LongBench uses (summary level; see
               :func:`rouge_l_summary`); 0 when either side has no sentence
rouge_zh       ``rouge`` over jieba words joined by spaces
classification the classes of ``all_classes`` named in the prediction, less those that are part of
               the ground truth without being it; 1/len(matches) if the ground truth is among
               them, else 0
retrieval      the share of the numbers in the prediction equal to the paragraph number of the
               ground truth ("Paragraph 7"; Chinese: "段落7"); 0 without numbers
count          the share of the numbers in the prediction equal to the ground truth
code_sim       the first line of the prediction without ``` ` ```, ``#`` or ``//``, compared with the
               ground truth by fuzzywuzzy's ``fuzz.ratio`` as LongBench's requirements install it
               (without python-Levenshtein): difflib's ``SequenceMatcher(None, a, b).ratio()`` in
               whole percent (1 for equal texts, else 0 if a side is empty); / 100
============== ==================================================================================

The Chinese metrics need ``jieba`` (``pip install jieba``); without it they raise ImportError
naming it.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

Metric = Callable[[str, str, Sequence[str]], float]
_EN_PUNCTUATION = set(string.punctuation)
_ZH_PUNCTUATION = set(string.punctuation) | set(
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")


def normalize_en(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def normalize_zh(text: str) -> str:
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_PUNCTUATION).split())


def token_f1(predicted: Sequence[str], expected: Sequence[str]) -> float:
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def _jieba_words(text: str) -> list[str]:
    try:
        import jieba
    except ImportError:
        raise ImportError("LongBench's Chinese metrics segment words with jieba: pip install jieba") from None
    return list(jieba.cut(text, cut_all=False))


def qa_f1(prediction: str, ground_truth: str, all_classes: Sequence[str] = ()) -> float:
    return token_f1(normalize_en(prediction).split(), normalize_en(ground_truth).split())


def qa_f1_zh(prediction: str, ground_truth: str, all_classes: Sequence[str] = ()) -> float:
    def words(text: str) -> list[str]:
        return [w for w in (normalize_zh(t) for t in _jieba_words(text)) if w]

    return token_f1(words(prediction), words(ground_truth))


def _sentences(text: str) -> list[str]:
    """The ``rouge`` package's sentences: split on ".", pieces of length 0 dropped, spaces collapsed."""
    return [" ".join(piece.split()) for piece in text.split(".") if piece]


def _lcs_words(x: list[str], y: list[str]) -> set[str]:
    """The words of one longest common subsequence of ``x`` and ``y``, traced back from the end of
    the DP table, preferring a step in ``x`` only when it is strictly better (the ``rouge`` package's choice)."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(table[i - 1][j], table[i][j - 1])
    words, i, j = set(), len(x), len(y)
    while i and j:
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l_summary(prediction: str, reference: str) -> float:
    """ROUGE-L F as ``rouge.Rouge().get_scores([prediction], [reference])["rouge-l"]["f"]`` computes it.

    Sentences as :func:`_sentences`; words split on single spaces; ``m`` / ``n`` the numbers of
    *distinct* words of the reference / prediction; ``llcs`` the number of distinct words in the
    union, over every (reference sentence, prediction sentence) pair, of one LCS's words;
    ``F = 2 P R / (P + R + 1e-8)`` with ``P = llcs / n``, ``R = llcs / m``. 0 if a side has no sentence.
    """
    hypothesis, references = _sentences(prediction), _sentences(reference)
    if not hypothesis or not references:
        return 0.0
    hyp_words = [s.split(" ") for s in hypothesis]
    ref_words = [s.split(" ") for s in references]
    n = len({w for s in hyp_words for w in s})
    m = len({w for s in ref_words for w in s})
    union: set[str] = set()
    for r in ref_words:
        for h in hyp_words:
            union |= _lcs_words(r, h)
    precision, recall = len(union) / n, len(union) / m
    return 2.0 * precision * recall / (precision + recall + 1e-8)


def rouge(prediction: str, ground_truth: str, all_classes: Sequence[str] = ()) -> float:
    return rouge_l_summary(prediction, ground_truth)


def rouge_zh(prediction: str, ground_truth: str, all_classes: Sequence[str] = ()) -> float:
    return rouge_l_summary(" ".join(_jieba_words(prediction)), " ".join(_jieba_words(ground_truth)))


def classification(prediction: str, ground_truth: str, all_classes: Sequence[str] = ()) -> float:
    matches = [c for c in all_classes if c in prediction]
    # LongBench removes from the list while iterating it, which skips the element after each removal
    kept, skip = [], False
    for position, term in enumerate(matches):
        if skip:
            kept.append(term)
            skip = False
            continue
        if term in ground_truth and term != ground_truth:
            skip = position + 1 < len(matches)
            continue
        kept.append(term)
    return 1.0 / len(kept) if ground_truth in kept else 0.0


def _number_share(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(number == target for number in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, ground_truth: str, all_classes: Sequence[str] = ()) -> float:
    return _number_share(prediction, re.findall(r"Paragraph (\d+)", ground_truth)[0])


def retrieval_zh(prediction: str, ground_truth: str, all_classes: Sequence[str] = ()) -> float:
    return _number_share(prediction, re.findall(r"段落(\d+)", ground_truth)[0])


def count(prediction: str, ground_truth: str, all_classes: Sequence[str] = ()) -> float:
    return _number_share(prediction, str(ground_truth))


def code_sim(prediction: str, ground_truth: str, all_classes: Sequence[str] = ()) -> float:
    first = next((line for line in prediction.lstrip("\n").split("\n")
                  if "`" not in line and "#" not in line and "//" not in line), "")
    if first == ground_truth:
        return 1.0
    if not first or not ground_truth:
        return 0.0
    return round(100 * difflib.SequenceMatcher(None, first, ground_truth).ratio()) / 100


METRICS: dict[str, Metric] = {
    "qa_f1": qa_f1, "qa_f1_zh": qa_f1_zh, "rouge": rouge, "rouge_zh": rouge_zh,
    "classification": classification, "retrieval": retrieval, "retrieval_zh": retrieval_zh,
    "count": count, "code_sim": code_sim,
}
