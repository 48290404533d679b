"""Stage 1: BM25 and k-NN candidates from OpenSearch, fused, each with exact provenance.

`rrf` and `convex` run both subqueries in one `_msearch` and fuse here (formulas in fusion.py).
`server` lets OpenSearch fuse through a hybrid query sent in the same `_msearch` as the two
subqueries alone, so every candidate's per-retriever rank and raw score are known exactly
(OpenSearch's hybrid response only has the fused score) in one round trip. A lexical-only profile
runs BM25 alone.

Two failures of `server` fusion are the cluster's, not the caller's: a cluster without the
neural-search plugin (no `hybrid` query) is a 400 that says so; a caller whose role has
document-level security hits the security plugin's hybrid-query bug (security #6416, neural-search
#1303) on releases before its fix, and gets client-side convex fusion of the same subqueries
instead, flagged in `FirstStage.fusion_fallback`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sidecar.retrieval.fusion import (
    Candidate,
    RetrieverHit,
    attach_provenance,
    fuse_convex,
    fuse_rrf,
)
from sidecar.retrieval.opensearch import Upstream
from sidecar.retrieval.profiles import IndexProfile
from sidecar.retrieval.queries import (
    Filter,
    build_hybrid_search,
    build_lexical_search,
    build_vector_search,
    combine_filters,
)
from sidecar.retrieval.transport import UpstreamError, error_body

Fusion = Literal["server", "rrf", "convex"]
FUSIONS: tuple[Fusion, ...] = ("server", "rrf", "convex")

# What the cluster says when the security plugin wrapped a hybrid query for a DLS role.
_DLS_HYBRID_SIGNS = ("hybrid query must be a top level query", "HybridQuery")
_NO_HYBRID_SIGN = "unknown query [hybrid]"


@dataclass(frozen=True)
class FirstStageQuery:
    index: str
    profile: IndexProfile
    text: str
    # The sidecar's own query embedding; None when the cluster embeds (neural) or no vector runs.
    vector: list[float] | None
    candidates: int
    fusion: Fusion = "convex"
    # (lexical, vector); None: the mode's default (equal weights).
    weights: tuple[float, float] | None = None
    filter: Filter | None = None
    # The identity headers of the caller the search is made for.
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FirstStage:
    """Fused candidates (best first, at most `candidates`) and each retriever's own list."""

    candidates: list[Candidate]
    lexical: Sequence[RetrieverHit]
    vector: Sequence[RetrieverHit]
    # Why `server` fusion was replaced by client-side convex fusion for this request, if it was.
    fusion_fallback: str | None = None


async def retrieve(upstream: Upstream, query: FirstStageQuery) -> FirstStage:
    """Raises UpstreamError."""
    profile = query.profile
    filter_clause = combine_filters(profile, query.filter)
    lexical_search = build_lexical_search(profile, query.text, query.candidates, filter_clause)
    if profile.embedding == "none":
        (lexical,) = await upstream.msearch(query.index, [lexical_search], headers=query.headers)
        lexical_hits = _hits(lexical)
        return FirstStage(attach_provenance(lexical_hits, lexical_hits, []), lexical_hits, [])
    subqueries = [
        lexical_search,
        build_vector_search(profile, query.text, query.vector, query.candidates, filter_clause),
    ]
    fusion_fallback: str | None = None
    if query.fusion == "server":
        hybrid = build_hybrid_search(
            profile,
            query.text,
            query.vector,
            query.candidates,
            filter_clause,
            query.weights or (0.5, 0.5),
        )
        # The hybrid item last: `msearch` raises the first failed item's error, and a subquery's
        # failure is the caller's answer whatever became of the hybrid query. The subqueries
        # only say where each retriever ranked a hit: their documents are not fetched again.
        ranks_only = [{**subquery, "_source": False} for subquery in subqueries]
        try:
            lexical, vector, fused = await upstream.msearch(
                query.index, [*ranks_only, hybrid], headers=query.headers
            )
        except UpstreamError as error:
            _raise_unless_dls_hybrid_bug(error)
            # The subqueries' answers went with the failed call: they are asked again, alone (a
            # second round trip only for a DLS role on a release with the bug).
            fusion_fallback = "dls_hybrid"
        else:
            lexical_hits, vector_hits = _hits(lexical), _hits(vector)
            return FirstStage(
                attach_provenance(_hits(fused), lexical_hits, vector_hits),
                lexical_hits,
                vector_hits,
            )
    lexical, vector = await upstream.msearch(query.index, subqueries, headers=query.headers)
    lexical_hits, vector_hits = _hits(lexical), _hits(vector)
    fusion: Fusion = "convex" if query.fusion == "server" else query.fusion
    return FirstStage(
        _fuse(query, lexical_hits, vector_hits, fusion),
        lexical_hits,
        vector_hits,
        fusion_fallback=fusion_fallback,
    )


def _fuse(
    query: FirstStageQuery,
    lexical: Sequence[RetrieverHit],
    vector: Sequence[RetrieverHit],
    fusion: Fusion,
) -> list[Candidate]:
    fuse = fuse_rrf if fusion == "rrf" else fuse_convex
    default_weights = (1.0, 1.0) if fusion == "rrf" else (0.5, 0.5)
    return fuse(lexical, vector, weights=query.weights or default_weights)[: query.candidates]


def _raise_unless_dls_hybrid_bug(error: UpstreamError) -> None:
    """Re-raise a failed hybrid search unless it is the DLS bug (then the caller falls back)."""
    answer = str(error.body)
    if _NO_HYBRID_SIGN in answer:
        reason = (
            "fusion 'server' needs the neural-search plugin's hybrid query, and this cluster has "
            "no neural-search plugin (it answered: unknown query [hybrid]); use fusion 'convex' "
            "or 'rrf', which fuse in the sidecar"
        )
        raise UpstreamError(400, error_body(400, "illegal_argument_exception", reason)) from error
    if not any(sign in answer for sign in _DLS_HYBRID_SIGNS):
        raise error


def _hits(response: Mapping[str, Any]) -> Sequence[RetrieverHit]:
    return [
        RetrieverHit(
            index=hit["_index"],
            id=hit["_id"],
            score=float(hit["_score"]),
            source=hit.get("_source", {}),
        )
        for hit in response["hits"]["hits"]
    ]
