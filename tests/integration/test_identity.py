"""Whose identity reaches the cluster: a recording proxy between the sidecar and the real node
sees the headers of every upstream call the sidecar makes — native search, interception, writes,
pass-through and the mapping reads made for them — in `forward` and in `service` mode."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from pydantic import SecretStr

from sidecar.embedding import BiEncoder
from tests.integration.conftest import Cluster
from tests.integration.sidecar_server import running_sidecar
from tests.integration.test_sidecar import QUERY, post

pytestmark = [pytest.mark.integration, pytest.mark.both_lines]

CALLER = {
    "Authorization": "Basic Y2FsbGVyOnB3",
    "securitytenant": "global",
    "opendistro_security_impersonate_as": "admin",
    "X-Proxy-User": "admin",
}
SERVICE_AUTHORIZATION = "Basic c2lkZWNhcjpzM2NyZXQ="  # sidecar:s3cret


class RecordingProxy:
    """Forwards every request to the node unchanged and records (method, path, headers); with
    `tls`, it answers on HTTPS (a TLS-terminating front of the real node)."""

    def __init__(self, target: str, tls: ssl.SSLContext | None = None) -> None:
        self.target = target.rstrip("/")
        self._tls = tls
        self.seen: list[tuple[str, str, CIMultiDict[str]]] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._ready.wait(30)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._tls)
        self._loop.run_until_complete(site.start())
        scheme = "https" if self._tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self._runner.addresses[0][1]}"
        self._session = self._loop.run_until_complete(self._new_session())
        self._ready.set()
        self._loop.run_forever()

    @staticmethod
    async def _new_session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(auto_decompress=False)

    async def _handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.path, CIMultiDict(request.headers)))
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in ("host", "content-length", "transfer-encoding")
        }
        async with self._session.request(
            request.method,
            self.target + request.path_qs,
            headers=headers,
            data=await request.read(),
        ) as answer:
            body = await answer.read()
            kept = {
                k: v
                for k, v in answer.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "connection")
            }
            return web.Response(status=answer.status, body=body, headers=kept)

    def clear(self) -> None:
        self.seen.clear()

    def stop(self) -> None:
        async def close() -> None:
            await self._session.close()
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()


@pytest.fixture(scope="module")
def recorder(opensearch: Cluster) -> Iterator[RecordingProxy]:
    proxy = RecordingProxy(opensearch.url)
    yield proxy
    proxy.stop()


def test_forward_mode_sends_the_callers_allowlisted_headers_on_every_call(
    recorder: RecordingProxy,
    encoder: BiEncoder,
    tiny_cross_encoder: Path,
    pydoc_index: str,
) -> None:
    with running_sidecar(
        recorder.url,
        tiny_cross_encoder,
        encoder,
        forward_headers=("authorization", "securitytenant"),
        service_username="sidecar",
        service_password=SecretStr("s3cret"),
    ) as server:
        recorder.clear()
        status, answer, _ = post(
            f"{server.url}/v1/search",
            {"index": pydoc_index, "query": QUERY, "k": 3, "candidates": 10},
            CALLER,
        )
        assert status == 200, answer
        status, answer, _ = post(
            f"{server.url}/{pydoc_index}/_search",
            {
                "query": {"match": {"text": "exception"}},
                "size": 3,
                "ext": {"rerank": {"query_context": {"query_text": QUERY}, "window": 5}},
            },
            CALLER,
        )
        assert status == 200, answer
        status, _, _ = post(f"{server.url}/{pydoc_index}/_count", {}, CALLER)
        assert status == 200
    calls = {(method, path): headers for method, path, headers in recorder.seen}
    for key in (
        ("GET", f"/{pydoc_index}/_mapping"),
        ("POST", "/_msearch"),
        ("POST", f"/{pydoc_index}/_search"),
        ("POST", f"/{pydoc_index}/_count"),
    ):
        headers = calls[key]
        assert headers.getall("Authorization") == [CALLER["Authorization"]], key
        assert headers.get("securitytenant") == "global", key
        assert "opendistro_security_impersonate_as" not in headers, key
        assert "X-Proxy-User" not in headers, key


def test_service_mode_sends_the_sidecars_credentials_for_every_caller(
    recorder: RecordingProxy,
    encoder: BiEncoder,
    tiny_cross_encoder: Path,
    pydoc_index: str,
) -> None:
    with running_sidecar(
        recorder.url,
        tiny_cross_encoder,
        encoder,
        upstream_identity="service",
        service_username="sidecar",
        service_password=SecretStr("s3cret"),
    ) as server:
        recorder.clear()
        status, answer, _ = post(
            f"{server.url}/v1/search",
            {"index": pydoc_index, "query": QUERY, "k": 3, "candidates": 10, "rerank": False},
            CALLER,
        )
        assert status == 200, answer
        status, _, _ = post(f"{server.url}/{pydoc_index}/_count", {}, CALLER)
        assert status == 200
    paths = {path for _, path, _ in recorder.seen}
    assert {"/_msearch", f"/{pydoc_index}/_count"} <= paths
    for method, path, headers in recorder.seen:
        assert headers.getall("Authorization") == [SERVICE_AUTHORIZATION], (method, path)
        assert "opendistro_security_impersonate_as" not in headers, (method, path)
