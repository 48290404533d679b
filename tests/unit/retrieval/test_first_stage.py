"""How the first stage treats a failed `server` (hybrid) fusion: the DLS bug falls back to the
sidecar's own fusion, flagged; a cluster without neural-search is a clear 400; anything else is
the cluster's own error. The upstream is a fake answering canned responses (pure logic)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from sidecar.retrieval.first_stage import FirstStageQuery, retrieve
from sidecar.retrieval.opensearch import Upstream
from sidecar.retrieval.profiles import discover_profile
from sidecar.retrieval.transport import UpstreamError, error_body

PROFILE = discover_profile(
    "idx",
    {
        "idx": {
            "mappings": {
                "properties": {
                    "text": {"type": "text"},
                    "vec": {"type": "knn_vector", "dimension": 2},
                }
            }
        }
    },
    "mini",
    2,
)
QUERY = FirstStageQuery(
    index="idx", profile=PROFILE, text="q", vector=[1.0, 0.0], candidates=3, fusion="server"
)


def hits(*scored: tuple[str, float]) -> dict[str, Any]:
    return {
        "hits": {
            "hits": [{"_index": "docs", "_id": i, "_score": s, "_source": {}} for i, s in scored]
        }
    }


LEXICAL = hits(("a", 3.0), ("b", 2.0), ("c", 1.0))
VECTOR = hits(("b", 0.9), ("c", 0.8), ("a", 0.1))


class FakeUpstream:
    def __init__(self, hybrid_error: UpstreamError | None) -> None:
        self.hybrid_error = hybrid_error

    async def search(self, index: str | None, body: Mapping[str, Any], **_: Any) -> dict[str, Any]:
        if self.hybrid_error is not None:
            raise self.hybrid_error
        return hits(("b", 1.0), ("a", 0.5))

    async def msearch(
        self, index: str, bodies: Sequence[Mapping[str, Any]], **_: Any
    ) -> list[dict[str, Any]]:
        return [LEXICAL, VECTOR]


def first_stage(hybrid_error: UpstreamError | None) -> Any:
    upstream: Upstream = FakeUpstream(hybrid_error)  # type: ignore[assignment]
    return asyncio.run(retrieve(upstream, QUERY))


def refused(reason: str, error_type: str = "search_phase_execution_exception") -> UpstreamError:
    return UpstreamError(400, error_body(400, error_type, reason))


def test_server_fusion_uses_the_clusters_fused_order() -> None:
    stage = first_stage(None)
    assert [c.id for c in stage.candidates] == ["b", "a"]
    assert stage.fusion_fallback is None


@pytest.mark.parametrize(
    "reason",
    [
        "hybrid query must be a top level query and cannot be wrapped into other queries",
        "class org.apache.lucene.search.BooleanQuery cannot be cast to class "
        "org.opensearch.neuralsearch.query.HybridQuery",
    ],
)
def test_the_dls_hybrid_bug_falls_back_to_client_fusion_flagged(reason: str) -> None:
    stage = first_stage(refused(reason))
    assert stage.fusion_fallback == "dls_hybrid"
    # Equal-weight min-max convex fusion: b 0.75, a 0.5, c 0.44.
    assert [c.id for c in stage.candidates] == ["b", "a", "c"]


def test_a_cluster_without_neural_search_is_told_which_fusion_to_use() -> None:
    with pytest.raises(UpstreamError) as raised:
        first_stage(refused("unknown query [hybrid]", "parsing_exception"))
    assert raised.value.status == 400
    reason = raised.value.body["error"]["reason"]
    assert "neural-search" in reason
    assert "'convex' or 'rrf'" in reason


def test_other_hybrid_failures_are_the_clusters_answer() -> None:
    forbidden = UpstreamError(403, error_body(403, "security_exception", "no permissions"))
    with pytest.raises(UpstreamError) as raised:
        first_stage(forbidden)
    assert raised.value is forbidden
