"""How a trained reranker is served, as `sidecar train-reranker` chose on validation queries and
recorded beside its weights (`serving.json`): the rerank depth it gains at, and optionally a
learned final scorer that replaces the one global blend weight.

The learned scorer is a logistic regression over the rerank logit and what the first stage
already knows about each candidate (its fused rank and score, each retriever's rank and score,
whether both found it, the text's length), so the reranker's advice can count for less deeper in
the list or where both retrievers agree. Its output, a probability, is the final score in [0, 1].
Applied here with numpy alone: the file holds numbers, never a pickle.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sidecar.retrieval.fusion import Candidate
from sidecar.scoring import FloatArray, minmax_first_stage

SERVING_FILE = "serving.json"
# Raised whenever the file's meaning changes; a sidecar refuses a version it does not know.
SERVING_VERSION = 1
FEATURES = (
    "rerank_logit",
    "rerank_logit_gap",  # the logit minus the best logit of the request's scored candidates
    "first_stage_normalized",
    "first_stage_log_rank",
    "lexical_reciprocal_rank",
    "lexical_score_ratio",  # BM25 score over the request's best, 0 where BM25 missed it
    "vector_reciprocal_rank",
    "vector_score_ratio",
    "both_retrievers",
    "log_text_chars",
)


class ServingFileError(ValueError):
    """A model's serving.json cannot be used; the message says why."""


@dataclass(frozen=True)
class Signals:
    """What the first stage knows about one candidate: fused score, each retriever's (rank, raw
    score) or None where it missed the candidate, and the length of the text the reranker read."""

    fused_score: float
    lexical: tuple[int, float] | None
    vector: tuple[int, float] | None
    text_chars: int


def signals_of(candidate: Candidate, text: str) -> Signals:
    def pair(source: Any) -> tuple[int, float] | None:
        return None if source is None else (source.rank, source.score)

    return Signals(
        candidate.fused_score, pair(candidate.lexical), pair(candidate.vector), len(text)
    )


def feature_rows(
    signals: Sequence[Signals], positions: Sequence[int], logits: Sequence[float]
) -> FloatArray:
    """One row of FEATURES per scored candidate: `signals` are all the request's candidates in
    first-stage order, `positions` index the scored ones, `logits` are theirs (aligned).

    Set-level figures (min-max of the fused score, the best logit, each retriever's best score)
    are taken over the request, as serving sees it; non-finite raw scores count as missing.
    """
    fused = minmax_first_stage([s.fused_score for s in signals])
    best_lexical = _best_score(s.lexical for s in signals)
    best_vector = _best_score(s.vector for s in signals)
    best_logit = max(logits, default=0.0)
    rows = [
        [
            logit,
            logit - best_logit,
            fused[position],
            math.log1p(position),
            *_retriever_features(signals[position].lexical, best_lexical),
            *_retriever_features(signals[position].vector, best_vector),
            float(signals[position].lexical is not None and signals[position].vector is not None),
            math.log1p(signals[position].text_chars),
        ]
        for position, logit in zip(positions, logits, strict=True)
    ]
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(FEATURES))


def _best_score(sources: Any) -> float:
    finite = [
        score for source in sources if source is not None and math.isfinite(score := source[1])
    ]
    return max(finite, default=0.0)


def _retriever_features(source: tuple[int, float] | None, best: float) -> tuple[float, float]:
    if source is None:
        return 0.0, 0.0
    rank, score = source
    ratio = score / best if best > 0.0 and math.isfinite(score) else 0.0
    return 1.0 / rank, ratio


@dataclass(frozen=True)
class LearnedScorer:
    """A standardized logistic regression over FEATURES: p = sigmoid(w . (x - mean) / scale + b)."""

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coefficients: tuple[float, ...]
    intercept: float

    def score(self, rows: FloatArray) -> list[float]:
        standardized = (rows - np.asarray(self.mean)) / np.asarray(self.scale)
        margin = standardized @ np.asarray(self.coefficients) + self.intercept
        result: list[float] = (1.0 / (1.0 + np.exp(-np.clip(margin, -500.0, 500.0)))).tolist()
        return result

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "logistic_regression",
            "features": list(FEATURES),
            "mean": list(self.mean),
            "scale": list(self.scale),
            "coefficients": list(self.coefficients),
            "intercept": self.intercept,
        }

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> LearnedScorer:
        if entry.get("kind") != "logistic_regression":
            raise ServingFileError(f"unknown final scorer kind {entry.get('kind')!r}")
        if tuple(entry.get("features", ())) != FEATURES:
            raise ServingFileError(
                f"the final scorer reads features {entry.get('features')}; this sidecar computes "
                f"{list(FEATURES)}"
            )
        mean, scale, coefficients = (
            tuple(float(v) for v in entry[key]) for key in ("mean", "scale", "coefficients")
        )
        if any(len(v) != len(FEATURES) for v in (mean, scale, coefficients)) or min(scale) <= 0:
            raise ServingFileError("the final scorer's mean, scale and coefficients do not fit")
        return cls(mean, scale, coefficients, float(entry["intercept"]))


@dataclass(frozen=True)
class Serving:
    """What serving.json tells `sidecar serve` about its model."""

    rerank_depth: int | None  # the default rerank depth; None: rerank every candidate
    final_scorer: LearnedScorer | None  # None: the blend (SIDECAR_ALPHA)
    alpha: float  # the blend weight chosen with it, for the card and `serve`'s hint
    # Whether any depth gained over the first stage on the validation queries; None: not
    # recorded (a file written before it was, or by hand).
    gained: bool | None = None


def read_serving(model_dir: Path) -> Serving | None:
    """The model folder's serving.json, or None when it has none (a model trained before it
    existed, or not by `sidecar train-reranker`). Raises ServingFileError for a file this
    sidecar cannot use: unreadable, another version, or a scorer that does not fit."""
    path = model_dir / SERVING_FILE
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        if entry.get("version") != SERVING_VERSION:
            raise ServingFileError(
                f"{path} is version {entry.get('version')!r}; this sidecar reads version "
                f"{SERVING_VERSION}"
            )
        scorer = entry.get("final_scorer")
        depth = entry.get("rerank_depth")
        gained = entry.get("gained")
        if gained is not None and not isinstance(gained, bool):
            raise ServingFileError(f"{path}: gained is {gained!r}, not true or false")
        return Serving(
            rerank_depth=None if depth is None else int(depth),
            final_scorer=None if scorer is None else LearnedScorer.from_json(scorer),
            alpha=float(entry["alpha"]),
            gained=gained,
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        if isinstance(error, ServingFileError):
            raise
        raise ServingFileError(f"{path}: {error}") from None


def write_serving(model_dir: Path, serving: Serving, validation: Mapping[str, Any]) -> Path:
    """serving.json with the choices and the validation figures they were made on."""
    path = model_dir / SERVING_FILE
    entry = {
        "version": SERVING_VERSION,
        "rerank_depth": serving.rerank_depth,
        "alpha": serving.alpha,
        "gained": serving.gained,
        "final_scorer": None if serving.final_scorer is None else serving.final_scorer.to_json(),
        "validation": validation,
    }
    path.write_text(json.dumps(entry, indent=1) + "\n", encoding="utf-8")
    return path
