"""Stage 2 on a real remote rerank server (KServe v2, and Infinity's Cohere-style /rerank): the
same search through a sidecar that calls the server and one that runs the same model in
process gets the same rerank scores; a tier that goes away costs no error, only flagged
unreranked answers, and its breaker opens."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import pytest

from sidecar.embedding import BiEncoder
from tests.integration.conftest import Cluster
from tests.integration.infinity_server import running_infinity
from tests.integration.kserve_server import running_kserve
from tests.integration.model_servers import MAX_LENGTH
from tests.integration.sidecar_server import RunningSidecar, metric_total, running_sidecar
from tests.integration.test_sidecar import QUERY, post

pytestmark = pytest.mark.integration

CANDIDATES = 20
# Float32 on both sides; the servers batch pairs differently from the sidecar (padding).
TOLERANCE = 1e-4


def rerank_scores(sidecar: RunningSidecar, index: str) -> tuple[dict[str, Any], dict[str, float]]:
    """The native answer's rerank report and each hit's rerank logit by id."""
    status, answer, _ = post(
        f"{sidecar.url}/v1/search",
        {"index": index, "query": QUERY, "k": CANDIDATES, "candidates": CANDIDATES},
    )
    assert status == 200, answer
    return answer["rerank"], {hit["id"]: hit["rerank_score"] for hit in answer["hits"]}


def in_process_scores(
    opensearch: Cluster, model: Path, encoder: BiEncoder, index: str
) -> dict[str, float]:
    with running_sidecar(opensearch.url, model, encoder) as sidecar:
        report, scores = rerank_scores(sidecar, index)
    assert report["applied"] is True
    return scores


def test_kserve_scores_equal_the_in_process_runtimes(
    opensearch: Cluster, encoder: BiEncoder, tiny_cross_encoder: Path, pydoc_index: str
) -> None:
    own = in_process_scores(opensearch, tiny_cross_encoder, encoder, pydoc_index)
    with (
        running_kserve(tiny_cross_encoder, max_length=MAX_LENGTH) as server,
        running_sidecar(
            opensearch.url,
            tiny_cross_encoder,
            encoder,
            reranker_backend="kserve",
            reranker_url=server.url,
            reranker_model=server.model,
            reranker_max_batch=8,  # 20 candidates: three calls, sent concurrently
        ) as sidecar,
    ):
        report, remote = rerank_scores(sidecar, pydoc_index)
        calls = metric_total(
            sidecar, 'sidecar_remote_rerank_requests_total{backend="kserve",outcome="ok"}'
        )
    assert report["applied"] is True
    assert report["device"] == "remote"
    assert remote.keys() == own.keys()
    assert [remote[i] for i in own] == pytest.approx(list(own.values()), abs=TOLERANCE)
    assert calls == 3


def test_infinity_scores_equal_the_in_process_runtimes(
    opensearch: Cluster, encoder: BiEncoder, sequence_classifier: Path, pydoc_index: str
) -> None:
    """Infinity answers sigmoids sorted by score: the sidecar maps them back by index and turns
    them back into logits."""
    own = in_process_scores(opensearch, sequence_classifier, encoder, pydoc_index)
    with (
        running_infinity(sequence_classifier) as server,
        running_sidecar(
            opensearch.url,
            sequence_classifier,
            encoder,
            reranker_backend="cohere",
            reranker_url=server.url,
            reranker_model=server.model,
        ) as sidecar,
    ):
        report, remote = rerank_scores(sidecar, pydoc_index)
    assert report["applied"] is True
    assert [remote[i] for i in own] == pytest.approx(list(own.values()), abs=TOLERANCE)


def test_a_tier_that_goes_away_costs_flagged_unreranked_answers_and_opens_the_breaker(
    opensearch: Cluster, encoder: BiEncoder, tiny_cross_encoder: Path, pydoc_index: str
) -> None:
    with running_kserve(tiny_cross_encoder, max_length=MAX_LENGTH) as server:
        url, model = server.url, server.model
    # The server is gone: its port refuses.
    with running_sidecar(
        opensearch.url,
        tiny_cross_encoder,
        encoder,
        reranker_backend="kserve",
        reranker_url=url,
        reranker_model=model,
        reranker_breaker_failures=2,
        reranker_breaker_open_s=60.0,
    ) as sidecar:
        reports = [rerank_scores(sidecar, pydoc_index)[0] for _ in range(4)]
        refused = metric_total(
            sidecar, 'sidecar_remote_rerank_requests_total{backend="kserve",outcome="breaker_open"}'
        )
        breaker = metric_total(sidecar, 'sidecar_remote_rerank_breaker_state{backend="kserve"}')
        fail_open = metric_total(sidecar, 'sidecar_fail_open_total{reason="backend_error"}')
        with urllib.request.urlopen(f"{sidecar.url}/readyz", timeout=30) as ready:
            status = ready.status
    assert all(r["applied"] is False and r["fail_open"] is True for r in reports)
    assert {r["reason"] for r in reports} == {"backend_error"}
    assert (refused, breaker, fail_open) == (2.0, 2.0, 4.0), "two calls failed, two never made"
    assert status == 200, "readiness does not depend on the tier"
