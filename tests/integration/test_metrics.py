"""Metrics proven against the real thing: a real Prometheus scrapes a sidecar that served real
queries on the real cluster; every dashboard expression must parse and return data, and the
provenance counters must agree with what the API said about each response."""

from __future__ import annotations

import json
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opensearchpy import OpenSearch

from sidecar.app import create_app
from sidecar.cli import main
from sidecar.embedding import BiEncoder
from sidecar.metrics import rank_range, score_range
from tests.integration.conftest import Cluster
from tests.integration.prometheus import RunningPrometheus, find_prometheus
from tests.integration.sidecar_server import RunningSidecar, running_sidecar, sidecar_settings
from tests.integration.test_sidecar import post
from tests.unit.test_dashboard import dashboard_expressions

pytestmark = pytest.mark.integration

DASHBOARD = Path(__file__).resolve().parents[2] / "grafana" / "dashboards" / "sidecar.json"
QUERIES = [
    "how do I make sure cleanup code runs even when an error is raised",
    "what does the with statement do",
    "defining a class with methods",
    "formatting numbers inside strings",
    "global and nonlocal names",
    "how are default argument values evaluated",
]


@pytest.fixture(scope="module")
def traffic_sidecar(
    opensearch: Cluster, encoder: BiEncoder, tiny_cross_encoder: Path, pydoc_index: str
) -> Iterator[RunningSidecar]:
    with running_sidecar(opensearch.url, tiny_cross_encoder, encoder) as server:
        yield server


@pytest.fixture(scope="module")
def prometheus(
    traffic_sidecar: RunningSidecar, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningPrometheus]:
    target = traffic_sidecar.url.removeprefix("http://")
    server = RunningPrometheus(find_prometheus(), tmp_path_factory.mktemp("prometheus"), [target])
    yield server
    server.stop()


def serve_traffic(sidecar: RunningSidecar, index: str, queries: list[str]) -> list[dict[str, Any]]:
    """Native searches (reranked), an intercepted search, pass-through requests and a bad request."""
    answers = []
    for query in queries:
        status, answer, _ = post(
            f"{sidecar.url}/v1/search", {"index": index, "query": query, "k": 10, "candidates": 30}
        )
        assert status == 200, answer
        answers.append(answer)
    client = OpenSearch(hosts=[sidecar.url], timeout=120)
    client.search(
        index=index,
        body={
            "query": {"match": {"text": "loop"}},
            "ext": {"rerank": {"query_context": {"query_text": "for loops"}, "window": 20}},
        },
    )
    client.cluster.health()
    client.count(index=index)
    status, _, _ = post(f"{sidecar.url}/v1/search", {"index": index})
    assert status == 400
    return answers


def test_every_dashboard_expression_parses_and_returns_data(
    traffic_sidecar: RunningSidecar, prometheus: RunningPrometheus, pydoc_index: str
) -> None:
    serve_traffic(traffic_sidecar, pydoc_index, QUERIES[:2])
    prometheus.wait_for_scrape()
    serve_traffic(traffic_sidecar, pydoc_index, QUERIES[2:4])
    prometheus.wait_for_scrape()
    expressions = dashboard_expressions(DASHBOARD)
    assert len(expressions) >= 20
    empty = []
    for expression in expressions:
        data = prometheus.query(expression)
        if not data["result"]:
            empty.append(expression)
    assert not empty, f"{len(empty)} dashboard expressions returned no data: {empty}"


def test_provenance_counters_agree_with_the_api(
    opensearch: Cluster,
    encoder: BiEncoder,
    tiny_cross_encoder: Path,
    pydoc_index: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = RunningSidecar(
        create_app(sidecar_settings(opensearch.url, tiny_cross_encoder), encoder=encoder)
    )
    prometheus = RunningPrometheus(
        find_prometheus(), tmp_path, [server.url.removeprefix("http://")]
    )
    try:
        answers = serve_traffic(server, pydoc_index, QUERIES)
        prometheus.wait_for_scrape()
        expected_hits: Counter[tuple[str, str]] = Counter()
        expected_scores: Counter[tuple[str, str]] = Counter()
        expected_candidates: Counter[str] = Counter()
        for answer in answers:
            expected_candidates.update({k: v for k, v in answer["candidate_sources"].items() if v})
            for hit in answer["hits"][:10]:
                lexical, vector = hit["sources"]["lexical"], hit["sources"]["vector"]
                source = (
                    "both" if lexical and vector else "lexical_only" if lexical else "vector_only"
                )
                expected_hits[(source, rank_range(hit["first_stage"]["rank"]))] += 1
                expected_scores[(source, score_range(hit["first_stage"]["normalized"]))] += 1

        def scraped(metric: str, labels: tuple[str, ...]) -> Counter[Any]:
            result = prometheus.query(metric)["result"]
            return Counter(
                {
                    tuple(r["metric"][label] for label in labels)
                    if len(labels) > 1
                    else r["metric"][labels[0]]: int(float(r["value"][1]))
                    for r in result
                }
            )

        assert scraped("sidecar_final_hits_total", ("source", "first_stage_rank")) == expected_hits
        assert (
            scraped("sidecar_final_hits_by_score_total", ("source", "first_stage_score"))
            == expected_scores
        )
        assert scraped("sidecar_candidates_total", ("source",)) == expected_candidates
        assert sum(expected_hits.values()) == 10 * len(QUERIES)

        assert main(["provenance", "--url", server.url]) == 0
        report = capsys.readouterr().out
        for source in {source for source, _ in expected_hits}:
            assert source in report
    finally:
        prometheus.stop()
        server.stop()


def test_metrics_endpoint_uses_small_fixed_label_sets(
    traffic_sidecar: RunningSidecar, pydoc_index: str
) -> None:
    serve_traffic(traffic_sidecar, pydoc_index, QUERIES[:1])
    with urllib.request.urlopen(f"{traffic_sidecar.url}/metrics") as response:
        text = response.read().decode()
    assert "sidecar_stage_duration_seconds_bucket" in text
    assert 'sidecar_requests_total{route="search",status="200"}' in text
    assert 'sidecar_requests_total{route="proxy",status="200"}' in text
    assert 'sidecar_rejected_requests_total{reason="bad_request"}' in text
    assert pydoc_index not in text, "index names never become labels"
    assert QUERIES[0] not in text, "query text never becomes a label"
    assert json.dumps(QUERIES[0]) not in text
