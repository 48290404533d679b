"""Score normalization, the last step of the request path: cross-encoder logits (and first-stage
scores, for blending) become the scores users see. Pure; a non-finite input raises, because a model
that emits NaN is broken and the caller's fail-open policy should handle it, not the ranking."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from sidecar.config import Normalization

FloatArray = NDArray[np.float64]


def normalize_scores(scores: Sequence[float], method: Normalization) -> list[float]:
    """Normalize one result set's scores; order is kept. Empty input gives [].

    - `sigmoid`: 1 / (1 + exp(-x)), in (0, 1) (float64 rounds to exactly 0.0 or 1.0 beyond
      |x| ~ 37). Depends on x alone, so scores compare across requests; the default.
    - `minmax`: (x - min) / (max - min) over the set, in [0, 1]; all-equal input gives 1.0 each.
      Only the order within this response means anything.
    - `zscore`: (x - mean) / std over the set (population std), unbounded, mean 0; all-equal
      input gives 0.0 each.

    Raises ValueError naming the first non-finite score's index, or an unknown method.
    """
    values = _finite_array(scores, "score")
    if values.size == 0:
        return []
    if method == "sigmoid":
        normalized = _sigmoid(values)
    elif method == "minmax":
        normalized = _minmax(values)
    elif method == "zscore":
        normalized = _zscore(values)
    else:
        raise ValueError(f"unknown normalization {method!r}; use sigmoid, minmax or zscore")
    result: list[float] = normalized.tolist()
    return result


def minmax_first_stage(scores: Sequence[float]) -> list[float]:
    """First-stage (fused) scores min-max normalized over the set for `blend`:
    (x - min) / (max - min), in [0, 1]; all-equal input gives 1.0 each.

    Raises ValueError naming the first non-finite score's index.
    """
    return normalize_scores(scores, "minmax")


def blend(
    rerank_normalized: Sequence[float], first_stage_normalized: Sequence[float], alpha: float
) -> list[float]:
    """Final score = alpha * rerank + (1 - alpha) * first_stage, element by element.

    alpha = 1 is the rerank score alone, alpha = 0 the first-stage score alone; with both inputs
    in [0, 1] the result is in [0, 1]. Raises ValueError when alpha is outside [0, 1], the
    lengths differ, or an input is not finite.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rerank = _finite_array(rerank_normalized, "rerank score")
    first_stage = _finite_array(first_stage_normalized, "first-stage score")
    if rerank.shape != first_stage.shape:
        raise ValueError(
            f"{rerank.size} rerank scores but {first_stage.size} first-stage scores; need one each"
        )
    result: list[float] = (alpha * rerank + (1.0 - alpha) * first_stage).tolist()
    return result


def rerank_order(
    logits: Sequence[float],
    first_stage_normalized: Sequence[float],
    normalization: Normalization,
    alpha: float,
) -> list[tuple[int, float]]:
    """(position, final score) of every reranked candidate, best first: the logits normalized,
    blended with the first-stage scores, ties kept in first-stage order. Raises as `blend`."""
    return best_first(blend(normalize_scores(logits, normalization), first_stage_normalized, alpha))


def best_first(final: Sequence[float]) -> list[tuple[int, float]]:
    """(position, final score) by descending score, ties kept in first-stage order."""
    return sorted(enumerate(final), key=lambda item: (-item[1], item[0]))


def _finite_array(scores: Sequence[float], what: str) -> FloatArray:
    values = np.asarray(scores, dtype=np.float64)
    non_finite = np.flatnonzero(~np.isfinite(values))
    if non_finite.size:
        index = int(non_finite[0])
        raise ValueError(f"{what} at index {index} is {values[index]}, not a finite number")
    return values


def _sigmoid(values: FloatArray) -> FloatArray:
    # exp only ever sees -|x| <= 0, so it cannot overflow; both branches equal 1 / (1 + exp(-x)).
    decay = np.exp(-np.abs(values))
    result: FloatArray = np.where(values >= 0.0, 1.0 / (1.0 + decay), decay / (1.0 + decay))
    return result


def _rescaled(values: FloatArray) -> FloatArray:
    # Min-max and z-score are unchanged by dividing by max|x|, and it keeps max - min and the
    # variance from overflowing on huge finite inputs.
    scale = np.abs(values).max()
    return values / scale if scale > 0.0 else values


def _minmax(values: FloatArray) -> FloatArray:
    scaled = _rescaled(values)
    low, high = float(scaled.min()), float(scaled.max())
    if low == high:
        return np.ones_like(scaled)
    return (scaled - low) / (high - low)


def _zscore(values: FloatArray) -> FloatArray:
    scaled = _rescaled(values)
    if scaled.min() == scaled.max():
        return np.zeros_like(scaled)
    return (scaled - float(scaled.mean())) / float(scaled.std())
