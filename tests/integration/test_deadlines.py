"""One time budget per request: a first stage that cannot finish within SIDECAR_REQUEST_TIMEOUT_S
is a 504 in OpenSearch's shape, counted, answered at the deadline and not at the upstream's own
timeout. The upstream is the real node behind a front that holds searches until released."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from sidecar.embedding import BiEncoder
from tests.integration.conftest import Cluster
from tests.integration.sidecar_server import metric_total, running_sidecar
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
        exceeded = metric_total(server, 'sidecar_deadline_exceeded_total{stage="retrieve"}')
    assert status == 504, answer
    assert answer["error"]["type"] == "timeout_exception"
    assert "retrieve stage" in answer["error"]["reason"]
    assert elapsed_s < BUDGET_S + MARGIN_S
    assert exceeded == 1.0


@pytest.mark.parametrize("path", ["/v1/search", "/test-pydoc/_search", "/test-pydoc/_doc/1"])
def test_a_client_that_stops_sending_its_body_gets_a_408_and_is_let_go(
    opensearch: Cluster, encoder: BiEncoder, tiny_cross_encoder: Path, pydoc_index: str, path: str
) -> None:
    """Content-Length 1,000 announced, 10 bytes sent, then silence (a slow-body attack): the
    sidecar answers 408 after SIDECAR_CLIENT_BODY_TIMEOUT_S and closes the connection."""
    with running_sidecar(
        opensearch.url, tiny_cross_encoder, encoder, client_body_timeout_s=BUDGET_S
    ) as server:
        host, port = server.url.removeprefix("http://").split(":")
        started = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=BUDGET_S + MARGIN_S) as client:
            method = "PUT" if "_doc" in path else "POST"
            client.sendall(
                f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                "Content-Length: 1000\r\n\r\n".encode()
                + b'{"query": '
            )
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
        elapsed_s = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_timeout_exception" in answer
    assert elapsed_s < BUDGET_S + MARGIN_S, "answered and closed, not held"


def test_a_client_that_never_finishes_its_headers_is_let_go(
    opensearch: Cluster, encoder: BiEncoder, tiny_cross_encoder: Path
) -> None:
    """Slowloris: a request line and a header trickled one byte at a time, never finished. The
    listener closes the connection after SIDECAR_LISTEN_KEEPALIVE_TIMEOUT_S, however the bytes
    keep coming (aiohttp counts from the last complete request, not the last byte)."""
    with running_sidecar(
        opensearch.url, tiny_cross_encoder, encoder, listen_keepalive_timeout_s=BUDGET_S
    ) as server:
        host, port = server.url.removeprefix("http://").split(":")
        started = time.monotonic()
        closed_after_s = None
        with socket.create_connection((host, int(port)), timeout=0.2) as client:
            for byte in b"GET /healthz HTTP/1.1\r\nHost: " + b"x" * 200:
                try:
                    client.sendall(bytes([byte]))
                    if client.recv(1) == b"":
                        closed_after_s = time.monotonic() - started
                        break
                except TimeoutError:
                    continue  # nothing to read yet: the connection is still open
                except OSError:
                    closed_after_s = time.monotonic() - started
                    break
    assert closed_after_s is not None, "the connection was held as long as the client trickled"
    assert closed_after_s < BUDGET_S + MARGIN_S
