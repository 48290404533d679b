"""Several nodes in SIDECAR_OPENSEARCH_URL: with one of them refusing connections, searches (the
first stage, the interception), the pass-through and writes all reach the cluster through the
other. The nodes are two proxies in front of the one real node; one is stopped (its port then
refuses), the other records what reached it."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.embedding import BiEncoder
from tests.integration.conftest import Cluster
from tests.integration.sidecar_server import metric_total, running_sidecar
from tests.integration.test_identity import RecordingProxy
from tests.integration.test_sidecar import QUERY, RERANKED, post

pytestmark = pytest.mark.integration


@pytest.fixture
def nodes(opensearch: Cluster) -> Iterator[tuple[str, RecordingProxy]]:
    """(URL of a node that refuses connections, the node that answers)."""
    down, up = RecordingProxy(opensearch.url), RecordingProxy(opensearch.url)
    down.stop()
    yield down.url, up
    up.stop()


def test_every_path_fails_over_to_a_node_that_answers(
    nodes: tuple[str, RecordingProxy],
    encoder: BiEncoder,
    tiny_cross_encoder: Path,
    pydoc_index: str,
) -> None:
    down, up = nodes
    with running_sidecar(
        f"{down},{up.url}", tiny_cross_encoder, encoder, upstream_timeout_s=5.0
    ) as server:
        for _ in range(3):  # the nodes are taken in turn: the dead one comes first at times
            status, answer, _ = post(
                f"{server.url}/v1/search",
                {"index": pydoc_index, "query": QUERY, "k": 3, "candidates": 10},
            )
            assert status == 200, answer
            status, answer, _ = post(f"{server.url}/{pydoc_index}/_search", RERANKED)
            assert status == 200, answer
            status, counted, _ = post(f"{server.url}/{pydoc_index}/_count", {})
            assert status == 200, counted
        status, written, _ = post(
            f"{server.url}/{pydoc_index}/_doc/failover-probe?refresh=true",
            {"title": "Failover", "text": "written while a node was down"},
        )
        assert status == 201, written
        deleted = urllib.request.Request(
            f"{server.url}/{pydoc_index}/_doc/failover-probe", method="DELETE"
        )
        with urllib.request.urlopen(deleted, timeout=30) as answer:
            assert answer.status == 200
        with urllib.request.urlopen(f"{server.url}/readyz", timeout=30) as ready:
            assert ready.status == 200
        failovers = metric_total(server, 'sidecar_upstream_failover_total{kind="proxy"}')
    assert failovers >= 1, "the pass-through met the dead node first at least once"
    paths = {path for _, path, _ in up.seen}
    assert {"/_msearch", f"/{pydoc_index}/_count", f"/{pydoc_index}/_doc/failover-probe"} <= paths
