"""Which part of a long document the cross-encoder reads: overlapping token windows over it, and
for `best_passage` the one window that a light lexical score says matches the query best.

The light score is BM25 over the windows' word-piece ids, with the IDF taken over every window
of the request: it costs a few microseconds per window and no model call, where choosing by the
bi-encoder would embed every window (as many forward passes as scoring them all with a small
cross-encoder at the same length). Pure functions, so the choice is tested without a model.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

# BM25's usual constants (Robertson et al.; Lucene's defaults).
_K1 = 1.2
_B = 0.75


def token_windows(tokens: int, length: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) spans of at most `length` tokens, each overlapping the previous by
    `overlap`, together covering all `tokens`; one span when the document fits."""
    if tokens <= length:
        return [(0, tokens)]
    stride = max(1, length - overlap)
    spans = []
    for start in range(0, tokens, stride):
        spans.append((start, min(start + length, tokens)))
        if start + length >= tokens:
            break
    return spans


def best_windows(query: Sequence[int], windows: Sequence[Sequence[Sequence[int]]]) -> list[int]:
    """For each document (a list of windows, each a list of token ids), the index of the window
    with the highest BM25 score for the `query` token ids; the earliest on a tie (the opening of
    a document, often its title, is the usual best guess), so a query sharing no token with a
    document gets its first window, as `first` truncation would."""
    every = [window for document in windows for window in document]
    if not every:
        return []
    frequency: Counter[int] = Counter()
    for window in every:
        frequency.update(set(window))
    terms = set(query)
    idf = {
        term: math.log(1 + (len(every) - frequency[term] + 0.5) / (frequency[term] + 0.5))
        for term in terms
    }
    average = sum(len(window) for window in every) / len(every) or 1.0
    chosen = []
    for document in windows:
        scores = [_bm25(window, terms, idf, average) for window in document]
        chosen.append(max(range(len(scores)), key=lambda i: (scores[i], -i)))
    return chosen


def _bm25(window: Sequence[int], terms: set[int], idf: dict[int, float], average: float) -> float:
    counts = Counter(token for token in window if token in terms)
    norm = _K1 * (1 - _B + _B * len(window) / average)
    return sum(idf[term] * n * (_K1 + 1) / (n + norm) for term, n in counts.items())
