"""Stage 1: BM25 and k-NN candidates from OpenSearch, fused, each with exact provenance.

`rrf` and `convex` run both subqueries in one `_msearch` and fuse here (formulas in fusion.py).
`server` lets OpenSearch fuse through the hybrid search pipeline and, concurrently, runs the two
subqueries alone in one `_msearch` so every candidate's per-retriever rank and raw score are known
exactly (OpenSearch's hybrid response only has the fused score).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sidecar.indexing.templates import HYBRID_PIPELINE
from sidecar.retrieval.fusion import (
    Candidate,
    RetrieverHit,
    attach_provenance,
    fuse_convex,
    fuse_rrf,
)
from sidecar.retrieval.opensearch import Upstream
from sidecar.retrieval.queries import (
    Filter,
    build_hybrid_search,
    build_lexical_search,
    build_vector_search,
)

Fusion = Literal["server", "rrf", "convex"]
FUSIONS: tuple[Fusion, ...] = ("server", "rrf", "convex")


@dataclass(frozen=True)
class FirstStageQuery:
    index: str
    text: str
    vector: list[float]
    candidates: int
    fusion: Fusion = "convex"
    # (lexical, vector); None: the mode's default (equal weights).
    weights: tuple[float, float] | None = None
    filter: Filter | None = None


async def retrieve(upstream: Upstream, query: FirstStageQuery) -> list[Candidate]:
    """Fused candidates, best first, at most `candidates` of them. Raises UpstreamError."""
    subqueries = [
        build_lexical_search(query.text, query.candidates, query.filter),
        build_vector_search(query.vector, query.candidates, query.filter),
    ]
    if query.fusion == "server":
        hybrid = build_hybrid_search(
            query.text, query.vector, query.candidates, query.filter, query.weights
        )
        params = {} if query.weights is not None else {"search_pipeline": HYBRID_PIPELINE}
        fused, (lexical, vector) = await asyncio.gather(
            upstream.search(query.index, hybrid, params), upstream.msearch(query.index, subqueries)
        )
        return attach_provenance(_hits(fused), _hits(lexical), _hits(vector))
    lexical, vector = await upstream.msearch(query.index, subqueries)
    if query.fusion == "rrf":
        return fuse_rrf(_hits(lexical), _hits(vector), weights=query.weights or (1.0, 1.0))[
            : query.candidates
        ]
    return fuse_convex(_hits(lexical), _hits(vector), weights=query.weights or (0.5, 0.5))[
        : query.candidates
    ]


def _hits(response: Mapping[str, Any]) -> Sequence[RetrieverHit]:
    return [
        RetrieverHit(id=hit["_id"], score=float(hit["_score"]), source=hit.get("_source", {}))
        for hit in response["hits"]["hits"]
    ]
