"""The wire shapes of the rerank servers the sidecar can call: what one call sends for one query and
its documents, and how the answer maps back to one score per document.

Scores are mapped back by the index each server returns (or, for the protocols that have none,
by their defined input order), never by the order the results happen to come in: TEI and the
Cohere-style servers sort their results by score. Each API states what its scores are: `logit`
(a cross-encoder's raw output, what the sidecar normalizes) or `probability` (a sigmoid of it,
turned back into a logit here so that normalization and the score cache see the same scale as
with the in-process runtimes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

from sidecar.config import ScoreKind

RemoteKind = Literal["tei", "cohere", "kserve", "opensearch-ml"]

# A probability this close to 0 or 1 is a saturated logit; clipped so the logit stays finite.
_EPSILON = 1e-7


class AnswerError(ValueError):
    """The server's answer does not have the shape its API promises (a wrong server or model)."""


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: dict[str, Any]


@dataclass(frozen=True)
class RerankApi:
    """One server protocol; `model` is the name (or ml-commons model id) the server knows."""

    kind: RemoteKind
    model: str
    # Pairs the server takes in one call (TEI refuses more than its --max-client-batch-size).
    max_batch: int
    scores: ScoreKind

    def call(self, query: str, documents: Sequence[str]) -> Call:
        """The request for one query and its documents."""
        if self.kind == "tei":
            # raw_scores: the logits, not TEI's sigmoid; truncate: the server cuts at the
            # model's length instead of refusing a long pair.
            body: dict[str, Any] = {
                "query": query,
                "texts": list(documents),
                "raw_scores": self.scores == "logit",
                "truncate": True,
                "truncation_direction": "Right",
            }
            return Call("POST", "/rerank", body)
        if self.kind == "cohere":
            body = {
                "model": self.model,
                "query": query,
                "documents": list(documents),
                "top_n": len(documents),
                "return_documents": False,
            }
            return Call("POST", "/rerank", body)
        if self.kind == "kserve":
            count = [len(documents)]
            body = {
                "inputs": [
                    {
                        "name": "query",
                        "shape": count,
                        "datatype": "BYTES",
                        "data": [query] * len(documents),
                    },
                    {"name": "document", "shape": count, "datatype": "BYTES", "data": documents},
                ]
            }
            return Call("POST", f"/v2/models/{quote(self.model, safe='')}/infer", body)
        body = {"query_text": query, "text_docs": list(documents)}
        return Call("POST", f"/_plugins/_ml/models/{quote(self.model, safe='')}/_predict", body)

    def logits(self, answer: Any, count: int) -> list[float]:
        """One logit per document of a call for `count` documents, in the order they were sent.
        Raises AnswerError when the answer is not of the API's shape or misses a document."""
        try:
            scores = self._scores(answer, count)
        except (KeyError, IndexError, TypeError, ValueError) as error:
            raise AnswerError(f"{self.kind} answer of an unexpected shape: {error!r}") from None
        if any(score is None for score in scores):
            raise AnswerError(f"{self.kind} answer has no score for some documents")
        values = [float(score) for score in scores if score is not None]
        if self.scores == "probability":
            return [_logit(value) for value in values]
        return values

    def _scores(self, answer: Any, count: int) -> list[float | None]:
        scores: list[float | None] = [None] * count
        if self.kind in ("tei", "cohere"):
            results = answer if self.kind == "tei" else answer["results"]
            field = "score" if self.kind == "tei" else "relevance_score"
            for result in results:
                scores[_index(result["index"], count)] = _number(result[field])
            return scores
        if self.kind == "kserve":
            (output,) = [o for o in answer["outputs"] if o["name"] == "score"] or answer["outputs"]
            data = output["data"]
            if len(data) != count:
                raise ValueError(f"{len(data)} scores for {count} documents")
            return [_number(value) for value in data]
        results = answer["inference_results"]
        if len(results) != count:
            raise ValueError(f"{len(results)} results for {count} documents")
        return [_number(result["output"][0]["data"][0]) for result in results]


def _index(value: Any, count: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < count:
        raise ValueError(f"index {value!r} outside the {count} documents sent")
    return value


def _number(value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"score {value!r} is not a number")
    return float(value)


def _logit(probability: float) -> float:
    clipped = min(max(probability, _EPSILON), 1.0 - _EPSILON)
    return math.log(clipped / (1.0 - clipped))


# Each API's defaults: its batch limit and what its scores are.
DEFAULTS: Mapping[RemoteKind, tuple[int, ScoreKind]] = {
    "tei": (32, "logit"),  # TEI's --max-client-batch-size default; raw_scores asked for
    "cohere": (64, "probability"),  # Cohere-style relevance_score is a sigmoid
    "kserve": (64, "logit"),
    "opensearch-ml": (32, "logit"),  # ml-commons' TEXT_SIMILARITY models give the raw output
}
