"""`filter_path` on the reranked `_search`: the sidecar's filtering against the real node's own,
expression by expression, and end to end through the sidecar."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from sidecar.api.filter_path import apply_filter_path, parse_filter_path
from tests.integration.conftest import Cluster
from tests.integration.sidecar_server import RunningSidecar
from tests.integration.test_sidecar import RERANKED, post

pytestmark = pytest.mark.integration

# Hits with `_source` objects and `fields` arrays of strings; and no hits (empty arrays).
WITH_HITS = {
    "query": {"match": {"text": "exception"}},
    "size": 3,
    "_source": ["title"],
    "fields": ["title"],
}
WITHOUT_HITS = {"query": {"term": {"title": "no-such-term"}}}


def searched(cluster: Cluster, index: str, body: dict[str, Any], query: str = "") -> dict[str, Any]:
    """The node's answer, with `took` (the one value that differs run to run) set to 0."""
    status, answer, _ = post(f"{cluster.url}/{index}/_search{query}", body)
    assert status == 200, answer
    if "took" in answer:
        answer["took"] = 0
    return answer


@pytest.mark.parametrize(
    "expression",
    [
        "hits.hits._id",
        "hits.hits._id, hits.hits._score",
        "hits.hits._sour*",
        "hits.hits.fields.title",
        "*.total",
        "hits.*.value",
        "**.title",
        "hits.**",
        "**",
        "-took",
        "-hits.hits._source",
        "-**.total",
        "-hits.hits.*.title",
        "hits.hits,-hits.hits._source",
        "hits,-hits.hits._id,-hits.total",
        "hits.total,-hits",
        "no_such_field",
        "took.no_such_field",
        "-took.no_such_field",
        "hits.hits._i?",
        "hits.hits.",
        ".",
        "-.",
        "",
        ",,",
    ],
)
def test_filtering_the_plain_answer_gives_the_nodes_own_filtered_answer(
    opensearch: Cluster, pydoc_index: str, expression: str
) -> None:
    for body, has_hits in ((WITH_HITS, True), (WITHOUT_HITS, False)):
        plain = searched(opensearch, pydoc_index, body)
        assert bool(plain["hits"]["hits"]) is has_hits
        own = searched(opensearch, pydoc_index, body, f"?filter_path={quote(expression)}")
        assert apply_filter_path(plain, parse_filter_path(expression)) == own, body


def test_a_reranked_search_is_filtered_after_reranking(
    tiny_sidecar: RunningSidecar, opensearch: Cluster, pydoc_index: str
) -> None:
    url = f"{tiny_sidecar.url}/{pydoc_index}/_search"
    status, full, _ = post(url, RERANKED)
    assert status == 200, full
    assert full["ext"]["rerank"]["applied"] is True
    status, filtered, headers = post(f"{url}?filter_path=hits.hits._id,hits.hits._score", RERANKED)
    assert status == 200, filtered
    assert "X-Sidecar-Rerank-Skipped" not in headers
    assert filtered == {
        "hits": {"hits": [{"_id": h["_id"], "_score": h["_score"]} for h in full["hits"]["hits"]]}
    }
    status, unfiltered, _ = post(f"{url}?filter_path=", RERANKED)
    assert status == 200, unfiltered
    assert unfiltered["hits"]["hits"] == full["hits"]["hits"]
    status, refused, _ = post(f"{url}?filter_path=-", RERANKED)
    _, direct, _ = post(f"{opensearch.url}/{pydoc_index}/_search?filter_path=-", WITH_HITS)
    assert (status, refused["error"]) == (400, direct["error"])
