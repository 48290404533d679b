"""Pure builders of the first stage's OpenSearch query DSL, from the index's profile. User text and
vectors only ever enter as values; a user filter enters only as a `filter` clause, never alongside
the scoring queries."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sidecar.retrieval.profiles import IndexProfile

Filter = Mapping[str, Any]


def combine_filters(profile: IndexProfile, request_filter: Filter | None) -> Filter | None:
    """The profile's default filter ANDed with the request's own, or whichever exists."""
    clauses = [f for f in (profile.default_filter, request_filter) if f is not None]
    if len(clauses) < 2:
        return clauses[0] if clauses else None
    return {"bool": {"filter": clauses}}


def build_lexical_query(
    profile: IndexProfile, text: str, filter_clause: Filter | None = None
) -> dict[str, Any]:
    """BM25 `multi_match` of `text` over the profile's fields, type and tie_breaker, filtered."""
    match: dict[str, Any] = {
        "query": text,
        "fields": list(profile.lexical_fields),
        "type": profile.lexical_type,
    }
    if profile.tie_breaker is not None:
        match["tie_breaker"] = profile.tie_breaker
    query = {"multi_match": match}
    if filter_clause is None:
        return query
    return {"bool": {"must": [query], "filter": [filter_clause]}}


def build_vector_query(
    profile: IndexProfile,
    text: str,
    vector: list[float] | None,
    k: int,
    filter_clause: Filter | None = None,
) -> dict[str, Any]:
    """The `k` nearest neighbours over the profile's vector field: a `knn` query of the sidecar's
    own query `vector`, or a `neural` query of `text` that the cluster embeds with its model. A
    filter is applied during the graph search (efficient filtering), so `k` hits still come back.

    Raises ValueError for a lexical-only profile, or a `knn` query without a vector."""
    if profile.vector_field is None or profile.embedding == "none":
        raise ValueError(f"profile {profile.name!r} has no vector field")
    clause: dict[str, Any]
    if profile.embedding == "neural":
        clause = {"query_text": text, "k": k}
        if profile.model is not None:
            clause["model_id"] = profile.model
        kind = "neural"
    else:
        if vector is None:
            raise ValueError("a knn query needs the query vector")
        clause = {"vector": vector, "k": k}
        kind = "knn"
    if filter_clause is not None:
        clause["filter"] = filter_clause
    return {kind: {profile.vector_field: clause}}


def build_lexical_search(
    profile: IndexProfile, text: str, candidates: int, filter_clause: Filter | None = None
) -> dict[str, Any]:
    return {
        "size": candidates,
        "_source": _source(profile),
        "query": build_lexical_query(profile, text, filter_clause),
    }


def build_vector_search(
    profile: IndexProfile,
    text: str,
    vector: list[float] | None,
    candidates: int,
    filter_clause: Filter | None = None,
) -> dict[str, Any]:
    return {
        "size": candidates,
        "_source": _source(profile),
        "query": build_vector_query(profile, text, vector, candidates, filter_clause),
    }


def build_hybrid_search(
    profile: IndexProfile,
    text: str,
    vector: list[float] | None,
    candidates: int,
    filter_clause: Filter | None = None,
    weights: tuple[float, float] = (0.5, 0.5),
) -> dict[str, Any]:
    """A `hybrid` query of the same two subqueries (lexical first, vector second: the order the
    weights follow), `candidates` deep in each, with its own min-max normalization pipeline in
    the body: it works on any cluster with neural-search, whatever pipelines exist there."""
    return {
        "size": candidates,
        "_source": _source(profile),
        "query": {
            "hybrid": {
                "queries": [
                    build_lexical_query(profile, text, filter_clause),
                    build_vector_query(profile, text, vector, candidates, filter_clause),
                ],
                "pagination_depth": candidates,
            }
        },
        "search_pipeline": {
            "phase_results_processors": [
                {
                    "normalization-processor": {
                        "normalization": {"technique": "min_max"},
                        "combination": {
                            "technique": "arithmetic_mean",
                            "parameters": {"weights": list(weights)},
                        },
                    }
                }
            ]
        },
    }


def _source(profile: IndexProfile) -> dict[str, Any]:
    # The vector (large, useless to clients) and whatever else the profile keeps back.
    return {"excludes": list(profile.source_excludes)}
