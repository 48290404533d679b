"""What the cluster would accept, the sidecar forwards: a bulk above the former 10 MiB cap, a long
poll that asks the cluster to wait longer than the sidecar's own read timeout — each sent through
the sidecar and straight to the real cluster, side by side."""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import Settings
from sidecar.embedding import BiEncoder
from tests.integration.conftest import Cluster
from tests.integration.sidecar_server import RunningSidecar, running_sidecar

pytestmark = pytest.mark.integration

BULK_BYTES = 12 * 1024 * 1024
# Short, so that a request asking the cluster to wait longer shows whose limit applies.
IDLE_TIMEOUT_S = 2.0
DEFAULTS = {f.name: f.default for f in dataclasses.fields(Settings)}


@pytest.fixture(scope="module")
def sidecar(
    opensearch: Cluster, encoder: BiEncoder, tiny_cross_encoder: Path
) -> Iterator[RunningSidecar]:
    """The default body limit and idle limit (the harness's own body limit is small)."""
    with running_sidecar(
        opensearch.url,
        tiny_cross_encoder,
        encoder,
        max_body_bytes=DEFAULTS["max_body_bytes"],
        pass_through_idle_timeout_s=DEFAULTS["pass_through_idle_timeout_s"],
    ) as server:
        yield server


@pytest.fixture
def impatient_sidecar(
    opensearch: Cluster, encoder: BiEncoder, tiny_cross_encoder: Path
) -> Iterator[RunningSidecar]:
    """Short read timeouts of its own (the pass-through's idle limit and the sidecar's own
    calls', which used to cut long polls)."""
    with running_sidecar(
        opensearch.url,
        tiny_cross_encoder,
        encoder,
        pass_through_idle_timeout_s=IDLE_TIMEOUT_S,
        upstream_timeout_s=IDLE_TIMEOUT_S,
    ) as server:
        yield server


def send(
    url: str, method: str = "GET", body: bytes | None = None, content_type: str = "application/json"
) -> tuple[int, dict[str, Any], float]:
    """Status, JSON answer and seconds taken."""
    request = urllib.request.Request(
        url, data=body, method=method, headers={"Content-Type": content_type}
    )
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read()), time.monotonic() - started
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), time.monotonic() - started


def bulk_body(index: str, start: int) -> bytes:
    """A `_bulk` of plain documents just above BULK_BYTES."""
    lines: list[bytes] = []
    size, n = 0, start
    filler = "lorem ipsum dolor sit amet " * 36  # about 1 KB per document
    while size < BULK_BYTES:
        for line in ({"index": {"_index": index, "_id": str(n)}}, {"n": n, "text": filler}):
            encoded = json.dumps(line).encode() + b"\n"
            lines.append(encoded)
            size += len(encoded)
        n += 1
    return b"".join(lines)


def test_a_twelve_mib_bulk_the_cluster_accepts_goes_through_the_sidecar(
    sidecar: RunningSidecar, opensearch: Cluster
) -> None:
    index = f"test-bulk-{uuid.uuid4().hex[:8]}"
    opensearch.client.indices.create(index=index, body={"settings": {"number_of_replicas": 0}})
    try:
        direct_body, through_body = bulk_body(index, 0), bulk_body(index, 100_000)
        assert len(through_body) > BULK_BYTES
        direct = send(f"{opensearch.url}/_bulk", "POST", direct_body, "application/x-ndjson")
        through = send(f"{sidecar.url}/_bulk", "POST", through_body, "application/x-ndjson")
        assert direct[0] == through[0] == 200, through[1].get("error")
        assert direct[1]["errors"] is through[1]["errors"] is False
        assert len(through[1]["items"]) == through_body.count(b"\n") // 2
        assert len(direct[1]["items"]) == direct_body.count(b"\n") // 2
        opensearch.client.indices.refresh(index=index)
        stored = opensearch.client.count(index=index)["count"]
        assert stored == len(direct[1]["items"]) + len(through[1]["items"])
    finally:
        opensearch.client.indices.delete(index=index, ignore_unavailable=True)


def test_a_long_poll_gets_the_clusters_own_answer_not_the_sidecars_timeout(
    impatient_sidecar: RunningSidecar, opensearch: Cluster
) -> None:
    """Waiting for nodes that never come: the cluster answers 408 when the request's own
    `timeout` runs out, which is longer than the sidecar's idle limit."""
    path = "/_cluster/health?wait_for_nodes=5&timeout=5s"
    direct = send(f"{opensearch.url}{path}")
    through = send(f"{impatient_sidecar.url}{path}")
    assert direct[0] == through[0] == 408, through[1]
    assert through[1]["timed_out"] is True
    assert through[1]["cluster_name"] == direct[1]["cluster_name"]
    assert through[2] >= 5.0 > IDLE_TIMEOUT_S
