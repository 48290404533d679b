"""First-stage fusion: merges the lexical (BM25) and vector (k-NN) hit lists into one candidate list
for the reranker, recording for each candidate the rank and raw score each retriever gave it.

Pure. A document is its (index, id) `DocKey`: under an alias or a pattern two indexes may hold the
same id, and those are two documents; a document found by both retrievers is one candidate only if
both agree on index and id. Each retriever's list is cleaned the same way before fusing: a repeated
key keeps only its first occurrence, and a hit with a non-finite raw score (NaN, +-inf) is treated as the worst score
of its list: it is ranked after every finite hit and fused with the list's lowest finite score
(0.0 when the list has none). Ranks are 1-based positions in the cleaned list, so they equal
OpenSearch's positions for a well-formed list; `SourceRank.score` stays the raw score as returned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sidecar.documents import DocKey
from sidecar.scoring import normalize_scores

# "neither" only comes from `attach_provenance`: OpenSearch fused in a doc that neither
# separately-run subquery returned.
Provenance = Literal["both", "lexical_only", "vector_only", "neither"]


@dataclass(frozen=True)
class RetrieverHit:
    """One hit of one subquery (or of OpenSearch's fused hybrid query), in the order returned."""

    index: str  # the concrete index OpenSearch found it in (`_index`)
    id: str
    score: float  # raw score as OpenSearch returned it
    source: Mapping[str, Any]  # document fields

    @property
    def key(self) -> DocKey:
        return DocKey(self.index, self.id)


@dataclass(frozen=True)
class SourceRank:
    """Where one retriever put a candidate."""

    rank: int  # 1-based within that retriever's cleaned result list
    score: float  # raw score from that retriever, possibly non-finite


@dataclass(frozen=True)
class Candidate:
    """One fused first-stage candidate; `lexical`/`vector` are None where that retriever missed it."""

    index: str
    id: str
    source: Mapping[str, Any]
    fused_score: float  # always finite
    lexical: SourceRank | None
    vector: SourceRank | None

    @property
    def key(self) -> DocKey:
        return DocKey(self.index, self.id)

    @property
    def provenance(self) -> Provenance:
        """Which retrievers returned this candidate."""
        if self.lexical is not None and self.vector is not None:
            return "both"
        if self.lexical is not None:
            return "lexical_only"
        if self.vector is not None:
            return "vector_only"
        return "neither"


@dataclass(frozen=True)
class _Ranked:
    hit: RetrieverHit
    rank: int
    fusable_score: (
        float  # the raw score, or the list's worst finite score in place of a non-finite one
    )


def fuse_rrf(
    lexical: Sequence[RetrieverHit],
    vector: Sequence[RetrieverHit],
    *,
    rank_constant: int = 60,
    weights: tuple[float, float] = (1.0, 1.0),
) -> list[Candidate]:
    """Reciprocal rank fusion: score(d) = sum over the retrievers r that returned d of
    weight_r / (rank_constant + rank_r(d)), with 1-based ranks. Raw scores are ignored, so
    BM25's unbounded scale and k-NN's similarity scale need no reconciling.

    Sorted by score descending, ties by best rank in either list, then (index, id).
    Raises ValueError for rank_constant < 1, or a negative, non-finite or all-zero weight.
    """
    if rank_constant < 1:
        raise ValueError(f"rank_constant must be at least 1, got {rank_constant}")
    _check_weights(weights)
    lexical_ranked, vector_ranked = _rank(lexical), _rank(vector)
    fused: dict[DocKey, float] = {}
    for ranked, weight in ((lexical_ranked, weights[0]), (vector_ranked, weights[1])):
        for key, entry in ranked.items():
            fused[key] = fused.get(key, 0.0) + weight / (rank_constant + entry.rank)
    return _sorted_candidates(fused, lexical_ranked, vector_ranked)


def fuse_convex(
    lexical: Sequence[RetrieverHit],
    vector: Sequence[RetrieverHit],
    *,
    weights: tuple[float, float] = (0.5, 0.5),
) -> list[Candidate]:
    """Convex combination of min-max normalized scores:
    score(d) = (w_lex * norm_lex(d) + w_vec * norm_vec(d)) / (w_lex + w_vec), in [0, 1], where
    norm_r(d) = (s - min_r) / (max_r - min_r) over retriever r's own list (1.0 for every hit when
    that list's scores are all equal) and 0 when r did not return d.

    The same shape as OpenSearch's normalization processor (min_max + arithmetic_mean) but not
    score-identical: OpenSearch maps a list's minimum to 0.001 rather than 0.
    Sorted by score descending, ties by best rank in either list, then (index, id).
    Raises ValueError for a negative, non-finite or all-zero weight.
    """
    _check_weights(weights)
    total_weight = weights[0] + weights[1]
    lexical_ranked, vector_ranked = _rank(lexical), _rank(vector)
    fused: dict[DocKey, float] = {}
    for ranked, weight in ((lexical_ranked, weights[0]), (vector_ranked, weights[1])):
        normalized = normalize_scores([e.fusable_score for e in ranked.values()], "minmax")
        for key, norm in zip(ranked, normalized, strict=True):
            fused[key] = fused.get(key, 0.0) + weight / total_weight * norm
    return _sorted_candidates(fused, lexical_ranked, vector_ranked)


def attach_provenance(
    fused: Sequence[RetrieverHit],
    lexical: Sequence[RetrieverHit],
    vector: Sequence[RetrieverHit],
) -> list[Candidate]:
    """For the `server` fusion mode, where OpenSearch's hybrid query already fused: each fused
    hit becomes a candidate with fused_score = its score and source = its source, in the order
    OpenSearch returned, and with the rank and raw score the separately-run lexical and vector
    subqueries gave it (None where a subquery did not return it).

    The fused list is cleaned like a retriever's: a repeated (index, id) keeps its first occurrence, and a
    non-finite fused score moves to the end with the list's lowest finite score (0.0 if none).
    """
    lexical_ranked, vector_ranked = _rank(lexical), _rank(vector)
    return [
        _candidate(entry.hit, entry.fusable_score, lexical_ranked, vector_ranked)
        for entry in _rank(fused).values()
    ]


def _check_weights(weights: tuple[float, float]) -> None:
    if not all(math.isfinite(w) and w >= 0.0 for w in weights) or sum(weights) == 0.0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {weights}")


def _rank(hits: Sequence[RetrieverHit]) -> dict[DocKey, _Ranked]:
    """The cleaned list (see the module docstring), keyed by (index, id) in rank order."""
    first: dict[DocKey, RetrieverHit] = {}
    for hit in hits:
        first.setdefault(hit.key, hit)
    # A stable sort on "is non-finite" keeps OpenSearch's order among finite and non-finite hits.
    ordered = sorted(first.values(), key=lambda hit: not math.isfinite(hit.score))
    worst = min((hit.score for hit in ordered if math.isfinite(hit.score)), default=0.0)
    return {
        hit.key: _Ranked(hit, rank, hit.score if math.isfinite(hit.score) else worst)
        for rank, hit in enumerate(ordered, start=1)
    }


def _sorted_candidates(
    fused: Mapping[DocKey, float],
    lexical: Mapping[DocKey, _Ranked],
    vector: Mapping[DocKey, _Ranked],
) -> list[Candidate]:
    candidates = [
        _candidate((lexical.get(key) or vector[key]).hit, score, lexical, vector)
        for key, score in fused.items()
    ]
    candidates.sort(key=lambda c: (-c.fused_score, _best_rank(c), c.key))
    return candidates


def _candidate(
    hit: RetrieverHit,
    fused_score: float,
    lexical: Mapping[DocKey, _Ranked],
    vector: Mapping[DocKey, _Ranked],
) -> Candidate:
    return Candidate(
        index=hit.index,
        id=hit.id,
        source=hit.source,
        fused_score=fused_score,
        lexical=_source_rank(lexical.get(hit.key)),
        vector=_source_rank(vector.get(hit.key)),
    )


def _source_rank(entry: _Ranked | None) -> SourceRank | None:
    return None if entry is None else SourceRank(rank=entry.rank, score=entry.hit.score)


def _best_rank(candidate: Candidate) -> int:
    return min(r.rank for r in (candidate.lexical, candidate.vector) if r is not None)
