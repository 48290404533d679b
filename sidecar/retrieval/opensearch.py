"""The first stage's connection to OpenSearch: one async client, explicit timeouts, and one mapping
from upstream failures to the status and OpenSearch-shaped body the sidecar answers with."""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import aiohttp
from opensearchpy import AsyncOpenSearch
from opensearchpy.exceptions import ConnectionError as TransportConnectionError
from opensearchpy.exceptions import ConnectionTimeout, SSLError, TransportError

from sidecar.metrics import Metrics
from sidecar.retrieval.identity import UpstreamIdentity


class UpstreamError(Exception):
    """OpenSearch refused or failed a request; `status` and `body` are what the client should see."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.body = body


def error_body(status: int, error_type: str, reason: str) -> dict[str, Any]:
    """OpenSearch's error shape, so clients parse the sidecar's errors like the cluster's."""
    cause = {"type": error_type, "reason": reason}
    return {"error": {"root_cause": [cause], **cause}, "status": status}


class Upstream:
    """Calls made for a caller take that caller's identity headers (`headers`, from
    UpstreamIdentity.for_caller); the sidecar's own calls (readiness, the profile check at
    start) take its own."""

    def __init__(
        self,
        url: str,
        timeout_s: float,
        metrics: Metrics,
        identity: UpstreamIdentity | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.client = AsyncOpenSearch(
            hosts=[url], timeout=timeout_s, max_retries=0, ssl_context=ssl_context
        )
        self._metrics = metrics
        self._own = identity.own() if identity is not None else {}

    async def close(self) -> None:
        await self.client.close()

    async def reachable(self) -> bool:
        try:
            return bool(await self.client.ping(headers=self._own))
        except TransportError:
            return False

    async def search(
        self,
        index: str | None,
        body: Mapping[str, Any],
        params: Mapping[str, str] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        async with self._measured("search"):
            response: dict[str, Any] = await self.client.search(
                index=index, body=body, params=dict(params or {}), headers=dict(headers or {})
            )
        return response

    async def mapping(self, index: str, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """`GET <index>/_mapping` with the identity `headers` (None: the sidecar's own): one
        entry per concrete index the expression names."""
        async with self._measured("mapping"):
            response: dict[str, Any] = await self.client.indices.get_mapping(
                index=index, headers=dict(self._own if headers is None else headers)
            )
        return response

    async def msearch(
        self,
        index: str,
        bodies: Sequence[Mapping[str, Any]],
        *,
        headers: Mapping[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """Run `bodies` against `index` in one round trip; any failed item fails the whole call."""
        lines: list[Mapping[str, Any]] = []
        for body in bodies:
            lines.extend(({"index": index}, body))
        async with self._measured("msearch"):
            response = await self.client.msearch(body=lines, headers=dict(headers or {}))
        results: list[dict[str, Any]] = response["responses"]
        for result in results:
            if "error" in result:
                status = int(result.get("status", 500))
                raise UpstreamError(status, {"error": result["error"], "status": status})
        return results

    @contextlib.asynccontextmanager
    async def _measured(self, kind: str) -> AsyncIterator[None]:
        """Times the round trip, counts it by status, and maps transport failures."""
        started = time.perf_counter()
        status = "200"
        try:
            yield
        except TransportError as error:
            mapped = _as_upstream_error(error)
            status = str(mapped.status) if isinstance(error.status_code, int) else "error"
            raise mapped from error
        finally:
            self._metrics.upstream_requests.labels(status).inc()
            self._metrics.upstream_duration.labels(kind).observe(time.perf_counter() - started)


def _as_upstream_error(error: TransportError) -> UpstreamError:
    if isinstance(error, ConnectionTimeout):
        return UpstreamError(
            504, error_body(504, "upstream_timeout", "OpenSearch did not answer in time")
        )
    # opensearch-py's async transport reports a failed handshake as a plain ConnectionError
    # whose `info` is aiohttp's SSL error.
    if isinstance(error, SSLError) or isinstance(error.info, ssl.SSLError | aiohttp.ClientSSLError):
        reason = (
            "OpenSearch's TLS certificate could not be verified; set SIDECAR_UPSTREAM_CA_CERTS "
            "to the cluster's CA bundle"
        )
        return UpstreamError(502, error_body(502, "upstream_tls_error", reason))
    if isinstance(error, TransportConnectionError):
        return UpstreamError(
            502, error_body(502, "upstream_unreachable", "OpenSearch is unreachable")
        )
    status = error.status_code if isinstance(error.status_code, int) else 502
    if isinstance(error.info, dict) and "error" in error.info:
        return UpstreamError(status, error.info)
    return UpstreamError(status, error_body(status, "upstream_error", str(error.error)))
