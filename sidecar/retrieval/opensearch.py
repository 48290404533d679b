"""The first stage's connection to OpenSearch: one async client, explicit timeouts, and one mapping
from upstream failures to the status and OpenSearch-shaped body the sidecar answers with."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
from opensearchpy import AsyncHttpConnection, AsyncOpenSearch
from opensearchpy.exceptions import (
    AuthenticationException,
    ConnectionTimeout,
    SSLError,
    TransportError,
)
from opensearchpy.exceptions import ConnectionError as TransportConnectionError

from sidecar.metrics import Metrics
from sidecar.retrieval.identity import UpstreamIdentity

# Connections kept to each node, here and by the pass-through's session.
CONNECTIONS_PER_NODE = 256


class UpstreamError(Exception):
    """OpenSearch refused or failed a request; `status` and `body` are what the client should see.

    `text` is the cluster's own body when it was not JSON (the security plugin's plain
    "Unauthorized"), relayed verbatim; `headers` are cluster headers relayed with it
    (`WWW-Authenticate` on a 401)."""

    def __init__(
        self,
        status: int,
        body: dict[str, Any],
        *,
        headers: Mapping[str, str] | None = None,
        text: str | None = None,
    ) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.body = body
        self.headers = dict(headers or {})
        self.text = text


def error_body(status: int, error_type: str, reason: str) -> dict[str, Any]:
    """OpenSearch's error shape, so clients parse the sidecar's errors like the cluster's."""
    cause = {"type": error_type, "reason": reason}
    return {"error": {"root_cause": [cause], **cause}, "status": status}


class _Challenged(AuthenticationException):
    """A 401 with the cluster's authentication challenge, which opensearch-py would drop."""

    def __init__(self, error: TransportError, challenge: str | None) -> None:
        super().__init__(*error.args)
        self.challenge = challenge


class _ChallengeKeepingConnection(AsyncHttpConnection):
    """opensearch-py raises on a 401 without the response headers; this keeps WWW-Authenticate
    so the caller gets the cluster's challenge, as they would talking to the cluster directly."""

    async def perform_request(
        self,
        method: str,
        url: str,
        params: Mapping[str, Any] | None = None,
        body: bytes | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (opensearch-py's signature)
        ignore: Collection[int] = (),
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, Mapping[str, str], str]:
        status, response_headers, raw = await super().perform_request(
            method, url, params, body, timeout, (*ignore, 401), headers
        )
        if status == 401 and 401 not in ignore:
            try:
                self._raise_error(status, raw, response_headers.get("content-type"))
            except TransportError as error:
                raise _Challenged(error, response_headers.get("WWW-Authenticate")) from None
        return status, response_headers, raw


class Upstream:
    """Calls made for a caller take that caller's identity headers (`headers`, from
    UpstreamIdentity.for_caller); the sidecar's own calls (readiness, the profile check at
    start) take its own."""

    def __init__(
        self,
        urls: Sequence[str],
        timeout_s: float,
        metrics: Metrics,
        identity: UpstreamIdentity | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        # Every call here is a read: on a connection error (refused, reset) it is retried on the
        # cluster's other nodes, each tried once; an answer, even an error (opensearch-py retries
        # 502, 503 and 504 and marks the node dead for them by default), is never retried.
        # Connections per node: as many as the pass-through's (opensearch-py's default is 10, and
        # `server` fusion holds two per search).
        self.client = AsyncOpenSearch(
            hosts=list(urls),
            timeout=timeout_s,
            max_retries=len(urls) - 1,
            retry_on_timeout=False,
            retry_on_status=(),
            maxsize=CONNECTIONS_PER_NODE,
            ssl_context=ssl_context,
            connection_class=_ChallengeKeepingConnection,
            http_auth=identity.signer if identity is not None else None,
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
        # The caller's parameters go in the URL as they are: given as `params`, opensearch-py
        # would take `timeout`, `request_timeout` and `ignore` as its own and never send them.
        path = f"/{quote(index, safe=',*')}/_search" if index else "/_search"
        if params:
            path += "?" + urlencode(params)
        async with self._measured("search"):
            response: dict[str, Any] = await self.client.transport.perform_request(
                "POST", path, body=body, headers=dict(headers or {})
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

    async def aliases(self, name: str, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """`GET _alias/<name>`: each index the alias `name` points to, with its alias settings."""
        return await self._metadata("GET", f"/_alias/{quote(name, safe='')}", headers)

    async def simulate_index(
        self, index: str, headers: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """`POST _index_template/_simulate_index/<index>`: the settings and mappings a new index
        (or data stream) of that name would get from the cluster's templates, before it exists."""
        path = f"/_index_template/_simulate_index/{quote(index, safe='')}"
        return await self._metadata("POST", path, headers)

    async def _metadata(
        self, method: str, path: str, headers: Mapping[str, str] | None
    ) -> dict[str, Any]:
        """A read of cluster metadata with the identity `headers` (None: the sidecar's own),
        timed and counted with the mapping reads."""
        async with self._measured("mapping"):
            response: dict[str, Any] = await self.client.transport.perform_request(
                method, path, headers=dict(self._own if headers is None else headers)
            )
        return response

    async def msearch(
        self,
        index: str,
        bodies: Sequence[Mapping[str, Any]],
        *,
        headers: Mapping[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """Run `bodies` against `index` in one round trip; any failed item fails the whole call.

        `_msearch` is a cluster-level permission: a caller refused it (403) who may still
        `_search` the index gets the bodies as parallel `_search` calls instead (counted)."""
        lines: list[Mapping[str, Any]] = []
        for body in bodies:
            lines.extend(({"index": index}, body))
        try:
            async with self._measured("msearch"):
                response = await self.client.msearch(body=lines, headers=dict(headers or {}))
        except UpstreamError as error:
            if error.status != 403:
                raise
            self._metrics.msearch_fallback.inc()
            return list(
                await asyncio.gather(
                    *(self.search(index, body, headers=headers) for body in bodies)
                )
            )
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
    challenge = getattr(error, "challenge", None)
    headers = {"WWW-Authenticate": challenge} if challenge else {}
    if isinstance(error.info, dict) and "error" in error.info:
        return UpstreamError(status, error.info, headers=headers)
    text = str(error.error)
    return UpstreamError(
        status, error_body(status, "upstream_error", text), headers=headers, text=text
    )
