"""Stage 1: BM25 and k-NN candidates from OpenSearch, fused, each with exact provenance.

`rrf` and `convex` run both subqueries in one `_msearch` and fuse here (formulas in fusion.py).
`server` lets OpenSearch fuse through a hybrid query and, concurrently, runs the two subqueries
alone in one `_msearch` so every candidate's per-retriever rank and raw score are known exactly
(OpenSearch's hybrid response only has the fused score). A lexical-only profile runs BM25 alone.
"""

from __future__ import annotations

import asyncio
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

Fusion = Literal["server", "rrf", "convex"]
FUSIONS: tuple[Fusion, ...] = ("server", "rrf", "convex")


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
    if query.fusion == "server":
        hybrid = build_hybrid_search(
            profile,
            query.text,
            query.vector,
            query.candidates,
            filter_clause,
            query.weights or (0.5, 0.5),
        )
        fused, (lexical, vector) = await asyncio.gather(
            upstream.search(query.index, hybrid, headers=query.headers),
            upstream.msearch(query.index, subqueries, headers=query.headers),
        )
        lexical_hits, vector_hits = _hits(lexical), _hits(vector)
        return FirstStage(
            attach_provenance(_hits(fused), lexical_hits, vector_hits), lexical_hits, vector_hits
        )
    lexical, vector = await upstream.msearch(query.index, subqueries, headers=query.headers)
    lexical_hits, vector_hits = _hits(lexical), _hits(vector)
    fuse = fuse_rrf if query.fusion == "rrf" else fuse_convex
    default_weights = (1.0, 1.0) if query.fusion == "rrf" else (0.5, 0.5)
    fused = fuse(lexical_hits, vector_hits, weights=query.weights or default_weights)
    return FirstStage(fused[: query.candidates], lexical_hits, vector_hits)


def _hits(response: Mapping[str, Any]) -> Sequence[RetrieverHit]:
    return [
        RetrieverHit(id=hit["_id"], score=float(hit["_score"]), source=hit.get("_source", {}))
        for hit in response["hits"]["hits"]
    ]
