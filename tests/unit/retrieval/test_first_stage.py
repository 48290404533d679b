"""`server` (hybrid) fusion: the hybrid query and its two subqueries in one `_msearch`; on failure
the DLS bug falls back to the sidecar's own fusion, flagged; a cluster without neural-search is a
clear 400; anything else is the cluster's own error. The upstream is a fake answering canned
responses (pure logic)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from sidecar.retrieval.first_stage import FirstStageQuery, retrieve
from sidecar.retrieval.fusion import SourceRank
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
    """`_msearch` as Upstream.msearch answers it: each body's canned hits by its query's kind,
    the first failed item raised; every call's bodies recorded."""

    def __init__(self, failures: Mapping[str, UpstreamError]) -> None:
        self.failures = failures
        self.calls: list[list[str]] = []
        self.bodies: list[list[Mapping[str, Any]]] = []

    async def msearch(
        self, index: str, bodies: Sequence[Mapping[str, Any]], **_: Any
    ) -> list[dict[str, Any]]:
        kinds = [next(iter(body["query"])) for body in bodies]
        self.calls.append(kinds)
        self.bodies.append(list(bodies))
        for kind in kinds:
            if kind in self.failures:
                raise self.failures[kind]
        return [ANSWERS[kind] for kind in kinds]


ANSWERS = {"multi_match": LEXICAL, "knn": VECTOR, "hybrid": hits(("b", 1.0), ("a", 0.5))}


def first_stage(hybrid_error: UpstreamError | None) -> Any:
    return run(FakeUpstream({"hybrid": hybrid_error} if hybrid_error else {}))


def run(fake: FakeUpstream) -> Any:
    upstream: Upstream = fake  # type: ignore[assignment]
    return asyncio.run(retrieve(upstream, QUERY))


def refused(reason: str, error_type: str = "search_phase_execution_exception") -> UpstreamError:
    return UpstreamError(400, error_body(400, error_type, reason))


def test_server_fusion_is_one_msearch_with_the_clusters_order_and_exact_provenance() -> None:
    fake = FakeUpstream({})
    stage = run(fake)
    assert fake.calls == [["multi_match", "knn", "hybrid"]]
    assert [c.id for c in stage.candidates] == ["b", "a"]
    # Each retriever's own rank and raw score, from the subqueries run alone.
    assert [(c.lexical, c.vector) for c in stage.candidates] == [
        (SourceRank(2, 2.0), SourceRank(1, 0.9)),
        (SourceRank(1, 3.0), SourceRank(3, 0.1)),
    ]
    assert stage.fusion_fallback is None
    # The subqueries only rank: the documents come once, with the hybrid query's hits.
    sources = [body["_source"] for body in fake.bodies[0]]
    assert sources[:2] == [False, False]
    assert sources[2] is not False


@pytest.mark.parametrize(
    "reason",
    [
        "hybrid query must be a top level query and cannot be wrapped into other queries",
        "class org.apache.lucene.search.BooleanQuery cannot be cast to class "
        "org.opensearch.neuralsearch.query.HybridQuery",
    ],
)
def test_the_dls_hybrid_bug_falls_back_to_client_fusion_flagged(reason: str) -> None:
    fake = FakeUpstream({"hybrid": refused(reason)})
    stage = run(fake)
    assert fake.calls == [["multi_match", "knn", "hybrid"], ["multi_match", "knn"]]
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


def test_a_failed_subquery_is_the_answer_whatever_the_hybrid_query_met() -> None:
    overloaded = UpstreamError(429, error_body(429, "rejected_execution_exception", "queue full"))
    dls_bug = refused("hybrid query must be a top level query")
    with pytest.raises(UpstreamError) as raised:
        run(FakeUpstream({"knn": overloaded, "hybrid": dls_bug}))
    assert raised.value is overloaded
