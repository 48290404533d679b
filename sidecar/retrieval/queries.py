"""Pure builders of the first stage's OpenSearch query DSL. User text only ever enters as a value."""

from __future__ import annotations

from typing import Any

from sidecar.indexing.templates import VECTOR_FIELD

# BM25 over both analyzed fields; a title match counts double, as titles are short and specific.
LEXICAL_FIELDS = ("title^2", "text")


def build_lexical_query(text: str) -> dict[str, Any]:
    """BM25 `multi_match` (best_fields) of `text` over title and text."""
    return {"multi_match": {"query": text, "fields": list(LEXICAL_FIELDS)}}


def build_knn_query(vector: list[float], k: int) -> dict[str, Any]:
    """Approximate k-NN over the HNSW graph: the `k` nearest neighbours of `vector`."""
    return {"knn": {VECTOR_FIELD: {"vector": vector, "k": k}}}


def build_hybrid_search(text: str, vector: list[float], candidates: int) -> dict[str, Any]:
    """A `hybrid` query (lexical first, vector second: the order the pipeline weights follow)
    returning `candidates` fused hits; run it with a hybrid search pipeline."""
    return {
        "size": candidates,
        "_source": {"excludes": [VECTOR_FIELD]},
        "query": {
            "hybrid": {"queries": [build_lexical_query(text), build_knn_query(vector, candidates)]}
        },
    }
