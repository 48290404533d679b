"""The calls the sidecar makes to OpenSearch for itself and its stages: searches, `_msearch`,
mapping and alias reads, template simulation, readiness. Each is one JSON round trip through
the request path's one transport (transport.py: node rotation, failover, ejection, errors)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlencode

from sidecar.metrics import Metrics
from sidecar.retrieval.identity import UpstreamIdentity
from sidecar.retrieval.transport import Transport, UpstreamError, error_body


class Upstream:
    """Calls made for a caller take that caller's identity headers (`headers`, from
    UpstreamIdentity.for_caller); the sidecar's own calls (readiness, the profile check at
    start) take its own."""

    def __init__(
        self, transport: Transport, metrics: Metrics, identity: UpstreamIdentity | None = None
    ) -> None:
        self.transport = transport
        self._metrics = metrics
        self._own = identity.own() if identity is not None else {}

    async def reachable(self) -> bool:
        """Whether a node answers `HEAD /` for the sidecar's own identity."""
        try:
            async with self.transport.request(
                "HEAD", "/", kind="ping", headers=self._own
            ) as answer:
                return answer.status < 400
        except UpstreamError:
            return False

    async def search(
        self,
        index: str | None,
        body: Mapping[str, Any],
        params: Mapping[str, str] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """`POST <index>/_search` with the caller's parameters in the URL as they are."""
        path = f"/{quote(index, safe=',*')}/_search" if index else "/_search"
        if params:
            path += "?" + urlencode(params)
        return await self._json("POST", path, "search", headers or {}, body=body)

    async def mapping(self, index: str, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """`GET <index>/_mapping` with the identity `headers` (None: the sidecar's own): one
        entry per concrete index the expression names."""
        return await self._metadata("GET", f"/{quote(index, safe=',*')}/_mapping", headers)

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
        timed with the mapping reads."""
        return await self._json(method, path, "mapping", self._own if headers is None else headers)

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
            response = await self._json("POST", "/_msearch", "msearch", headers or {}, lines=lines)
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

    async def _json(
        self,
        method: str,
        path: str,
        kind: str,
        headers: Mapping[str, str],
        *,
        body: Mapping[str, Any] | None = None,
        lines: Sequence[Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        answer = await self.transport.json(
            method, path, kind=kind, headers=headers, body=body, ndjson=lines
        )
        if not isinstance(answer, dict):
            raise UpstreamError(
                502, error_body(502, "upstream_error", "OpenSearch answered with no JSON object")
            )
        return answer
