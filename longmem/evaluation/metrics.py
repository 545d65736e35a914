"""Text metrics: accuracy, exact match, token F1 (SQuAD), BLEU (Papineni et al. 2002) and ROUGE-L (Lin 2004).

Texts are compared as lists of tokens; ``tokens`` splits on whitespace after
lower-casing, or into characters with ``chars=True`` (for character-level tasks).
"""
from __future__ import annotations

import math
from collections import Counter


def tokens(text: str, *, chars: bool = False) -> list[str]:
    text = text.lower().strip()
    return list(text) if chars else text.split()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the texts are equal after lower-casing and stripping surrounding whitespace."""
    return float(prediction.strip().lower() == reference.strip().lower())


def accuracy(predictions: list[str], references: list[str]) -> float:
    """Fraction of exact matches (see :func:`exact_match`)."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"accuracy needs as many predictions as references, and some: got {len(predictions)} "
                         f"and {len(references)}")
    return sum(map(exact_match, predictions, references)) / len(predictions)


def token_f1(prediction: list[str], reference: list[str]) -> float:
    """Harmonic mean of precision and recall of the shared tokens (multiset overlap)."""
    if not prediction and not reference:
        return 1.0
    common = sum((Counter(prediction) & Counter(reference)).values())
    if common == 0:
        return 0.0
    p, r = common / len(prediction), common / len(reference)
    return 2 * p * r / (p + r)


def _ngrams(seq: list[str], n: int) -> Counter:
    return Counter(tuple(seq[i:i + n]) for i in range(len(seq) - n + 1))


def bleu(predictions: list[list[str]], references: list[list[str]], *, max_n: int = 4, smooth: bool = False) -> float:
    """Corpus BLEU in [0, 1]: geometric mean of clipped n-gram precisions (n = 1..max_n, summed over the
    corpus) times the brevity penalty. ``smooth`` adds 1 to numerator and denominator of n > 1
    (Lin & Och 2004), useful for single short sentences."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    match, total = [0] * max_n, [0] * max_n
    pred_len = ref_len = 0
    for pred, ref in zip(predictions, references):
        pred_len, ref_len = pred_len + len(pred), ref_len + len(ref)
        for n in range(1, max_n + 1):
            p, r = _ngrams(pred, n), _ngrams(ref, n)
            match[n - 1] += sum((p & r).values())
            total[n - 1] += max(0, len(pred) - n + 1)
    if pred_len == 0:
        return 0.0
    log_p = 0.0
    for n in range(max_n):
        m, t = match[n], total[n]
        if smooth and n > 0:
            m, t = m + 1, t + 1
        if m == 0 or t == 0:
            return 0.0
        log_p += math.log(m / t) / max_n
    bp = 1.0 if pred_len > ref_len else math.exp(1 - ref_len / pred_len)
    return bp * math.exp(log_p)


def lcs_length(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: list[str], reference: list[str], *, beta: float = 1.0) -> float:
    """ROUGE-L F-measure from the longest common subsequence (beta = 1: the F1 most toolkits report)."""
    if not prediction or not reference:
        return float(prediction == reference)
    lcs = lcs_length(prediction, reference)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(prediction), lcs / len(reference)
    return (1 + beta ** 2) * p * r / (r + beta ** 2 * p)
