"""Pure builders of the first stage's OpenSearch query DSL. User text and vectors only ever enter
as values; a user filter enters only as a `filter` clause, never alongside the scoring queries."""

from __future__ import annotations

from typing import Any

from sidecar.indexing.templates import VECTOR_FIELD

# BM25 over both analyzed fields; a title match counts double, as titles are short and specific.
LEXICAL_FIELDS = ("title^2", "text")
# Returned with every hit; the vector itself never is (it is large and useless to clients).
_SOURCE = {"excludes": [VECTOR_FIELD]}

Filter = dict[str, Any]


def build_lexical_query(text: str, filter_clause: Filter | None = None) -> dict[str, Any]:
    """BM25 `multi_match` (best_fields) of `text` over title and text, optionally filtered."""
    match = {"multi_match": {"query": text, "fields": list(LEXICAL_FIELDS)}}
    if filter_clause is None:
        return match
    return {"bool": {"must": [match], "filter": [filter_clause]}}


def build_knn_query(
    vector: list[float], k: int, filter_clause: Filter | None = None
) -> dict[str, Any]:
    """Approximate k-NN over the HNSW graph: the `k` nearest neighbours of `vector`; a filter is
    applied during the graph search (efficient filtering), so `k` hits still come back."""
    knn: dict[str, Any] = {"vector": vector, "k": k}
    if filter_clause is not None:
        knn["filter"] = filter_clause
    return {"knn": {VECTOR_FIELD: knn}}


def build_lexical_search(
    text: str, candidates: int, filter_clause: Filter | None = None
) -> dict[str, Any]:
    return {
        "size": candidates,
        "_source": _SOURCE,
        "query": build_lexical_query(text, filter_clause),
    }


def build_vector_search(
    vector: list[float], candidates: int, filter_clause: Filter | None = None
) -> dict[str, Any]:
    return {
        "size": candidates,
        "_source": _SOURCE,
        "query": build_knn_query(vector, candidates, filter_clause),
    }


def build_hybrid_search(
    text: str,
    vector: list[float],
    candidates: int,
    filter_clause: Filter | None = None,
    weights: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """A `hybrid` query of the same two subqueries (lexical first, vector second: the order the
    pipeline weights follow), `candidates` deep in each. Run it with a hybrid search pipeline;
    with `weights`, the body carries its own min-max pipeline with those weights instead."""
    body: dict[str, Any] = {
        "size": candidates,
        "_source": _SOURCE,
        "query": {
            "hybrid": {
                "queries": [
                    build_lexical_query(text, filter_clause),
                    build_knn_query(vector, candidates, filter_clause),
                ],
                "pagination_depth": candidates,
            }
        },
    }
    if weights is not None:
        body["search_pipeline"] = {
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
        }
    return body
