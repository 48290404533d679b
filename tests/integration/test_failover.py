"""Several nodes in SIDECAR_OPENSEARCH_URL: with one of them refusing connections, searches (the
first stage, the interception), the pass-through and writes all reach the cluster through the
other; the dead node is met once, then left out of the rotation. The nodes are two proxies in
front of the one real node; one is stopped (its port then refuses), the other records what
reached it."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.embedding import BiEncoder
from tests.integration.conftest import Cluster
from tests.integration.fault_proxy import running_toxiproxy
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
        failovers = metric_total(server, "sidecar_upstream_failover_total")
        dead = down.removeprefix("http://").rstrip("/")
        ejected = metric_total(server, f'sidecar_upstream_node_ejected{{node="{dead}"}}')
        ejections = metric_total(server, f'sidecar_upstream_ejections_total{{node="{dead}"}}')
    assert failovers >= 1, "the first call to meet the dead node went on to the other"
    assert (ejected, ejections) == (1.0, 1.0), "then the dead node was left out, not met again"
    paths = {path for _, path, _ in up.seen}
    assert {"/_msearch", f"/{pydoc_index}/_count", f"/{pydoc_index}/_doc/failover-probe"} <= paths


BLACKHOLE_TIMEOUT_S = 2.0  # SIDECAR_UPSTREAM_TIMEOUT_S and the pass-through's idle limit here
# Bound on the background probe putting the node back once it answers: its interval doubles
# from 1 s while the node stays silent, up to 30 s.
RESTORED_WITHIN_S = 60.0


def test_a_blackholed_node_costs_one_timeout_and_is_probed_back_when_it_answers(
    opensearch: Cluster, encoder: BiEncoder, tiny_cross_encoder: Path, pydoc_index: str
) -> None:
    """One of two nodes takes connections and drops every answer (a Toxiproxy `timeout` toxic
    with no timeout: a hung node, or a network path that lost its way back). The request that
    reaches it waits out the read timeout (it may have run there: it is not sent again); every
    later one goes to the other node at once. When the node answers again, the background
    probe puts it back and requests reach it again."""
    with (
        running_toxiproxy(opensearch.url) as toxiproxy,
        running_sidecar(
            f"{toxiproxy.url},{opensearch.url}",
            tiny_cross_encoder,
            encoder,
            upstream_timeout_s=BLACKHOLE_TIMEOUT_S,
            pass_through_idle_timeout_s=BLACKHOLE_TIMEOUT_S,
        ) as server,
    ):
        node = toxiproxy.url.removeprefix("http://")
        reached = f'sidecar_upstream_requests_total{{node="{node}",status="200"}}'
        calls = [
            lambda: post(
                f"{server.url}/v1/search",
                {"index": pydoc_index, "query": QUERY, "k": 3, "candidates": 10},
            ),
            lambda: post(f"{server.url}/{pydoc_index}/_count", {}),
        ]
        with toxiproxy.fault("timeout", timeout=0):
            outcomes = []
            for turn in range(10):
                started = time.monotonic()
                status, _, _ = calls[turn % 2]()
                outcomes.append((status, time.monotonic() - started))
            ejected = metric_total(server, f'sidecar_upstream_node_ejected{{node="{node}"}}')
        slow = [(status, s) for status, s in outcomes if s >= BLACKHOLE_TIMEOUT_S]
        assert len(slow) <= 1, f"one timeout, not one per round: {outcomes}"
        assert all(status == 200 for status, s in outcomes if s < BLACKHOLE_TIMEOUT_S), outcomes
        assert ejected == 1.0
        assert metric_total(server, f'sidecar_upstream_ejections_total{{node="{node}"}}') == 1.0

        give_up = time.monotonic() + RESTORED_WITHIN_S
        while metric_total(server, f'sidecar_upstream_node_ejected{{node="{node}"}}') == 1.0:
            assert time.monotonic() < give_up, "the probe never put the node back"
            time.sleep(0.2)
        before = metric_total(server, reached)
        for turn in range(4):
            assert calls[turn % 2]()[0] == 200
        assert metric_total(server, reached) > before, "the node is back in the rotation"
