"""One time budget per request: a first stage that cannot finish within SIDECAR_REQUEST_TIMEOUT_S
is a 504 in OpenSearch's shape, counted, answered at the deadline and not at the upstream's own
timeout. The upstream is the real node behind a front that holds searches until released."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from sidecar.embedding import BiEncoder
from tests.integration.conftest import Cluster
from tests.integration.sidecar_server import running_sidecar
from tests.integration.test_identity import RecordingProxy
from tests.integration.test_sidecar import QUERY, post

pytestmark = pytest.mark.integration

BUDGET_S = 1.0
# Generous against a loaded CI machine; the point is "at the budget, not at the upstream's 30 s".
MARGIN_S = 4.0


class StallingFront(RecordingProxy):
    """Forwards everything but searches, which wait until `release` (never, in these tests)."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.release = asyncio.Event()

    async def _handle(self, request: web.Request) -> web.Response:
        if request.path.endswith(("/_search", "/_msearch")):
            await self.release.wait()
        return await super()._handle(request)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self.release.set)
        super().stop()


@pytest.fixture
def stalling(opensearch: Cluster) -> Iterator[StallingFront]:
    front = StallingFront(opensearch.url)
    yield front
    front.stop()


@pytest.mark.parametrize("route", ["native", "interception"])
def test_a_stalled_first_stage_is_a_504_at_the_deadline(
    stalling: StallingFront,
    encoder: BiEncoder,
    tiny_cross_encoder: Path,
    pydoc_index: str,
    route: str,
) -> None:
    with running_sidecar(
        stalling.url, tiny_cross_encoder, encoder, request_timeout_s=BUDGET_S
    ) as server:
        if route == "native":
            url, body = f"{server.url}/v1/search", {"index": pydoc_index, "query": QUERY}
        else:
            url = f"{server.url}/{pydoc_index}/_search"
            body = {
                "query": {"match": {"text": "exception"}},
                "ext": {"rerank": {"query_context": {"query_text": QUERY}}},
            }
        started = time.monotonic()
        status, answer, _ = post(url, body)
        elapsed_s = time.monotonic() - started
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as metrics:
            exposed = metrics.read().decode()
    assert status == 504, answer
    assert answer["error"]["type"] == "timeout_exception"
    assert "retrieve stage" in answer["error"]["reason"]
    assert elapsed_s < BUDGET_S + MARGIN_S
    assert 'sidecar_deadline_exceeded_total{stage="retrieve"} 1.0' in exposed
