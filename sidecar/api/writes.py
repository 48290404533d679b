"""Write routes: `_doc`, `_create`, `_update` and `_bulk` requests are handed to the write path
(which adds vectors for embed-on-write indexes), then forwarded; other methods on these paths, and
single-document writes to indexes that do not embed on write, pass through unread. A `_bulk` is
read (up to SIDECAR_MAX_BODY_BYTES, the cluster's own default limit): its items name their
indexes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from sidecar.api import proxy
from sidecar.api.errors import ApiError
from sidecar.api.responses import forward_upstream
from sidecar.retrieval.profiles import IndexProfile
from sidecar.services import SERVICES
from sidecar.write_path import Fetch

# (profile, index, body, caller identity headers) -> the body with its vectors, or None.
Enrich = Callable[[IndexProfile, str, bytes, Mapping[str, str]], Awaitable[bytes | None]]


async def write_document(request: web.Request) -> web.StreamResponse:
    """`_doc`/`_create`: the document gets its vector if its index embeds on write."""
    return await _single_write(request, request.app[SERVICES].writes.document)


async def write_update(request: web.Request) -> web.StreamResponse:
    """`_update`: its `doc`/`upsert` get their vector if the index embeds on write."""
    writes = request.app[SERVICES].writes

    async def enrich(
        profile: IndexProfile, index: str, body: bytes, caller: Mapping[str, str]
    ) -> bytes | None:
        doc_id, routing = request.match_info["id"], request.query.get("routing")
        fetch = _stored_documents(request)
        return await writes.update(profile, index, doc_id, routing, body, fetch, caller)

    return await _single_write(request, enrich)


async def _single_write(request: web.Request, enrich: Enrich) -> web.StreamResponse:
    """A single-document write: read and given its vector (`enrich`) when its index embeds on
    write; any other index's write streams through unread."""
    services = request.app[SERVICES]
    index = request.match_info["index"]
    caller = services.identity.for_caller(request.headers)
    profile = await services.writes.target(index, caller)
    if profile is None:
        return await forward_upstream(request)
    body = await _write_body(request)
    return await _forward_write(request, body, await enrich(profile, index, body, caller))


async def write_bulk(request: web.Request) -> web.StreamResponse:
    """`_bulk`: documents bound for embed-on-write indexes get their vectors, in batches."""
    services = request.app[SERVICES]
    body = await _write_body(request)
    enriched = await services.writes.bulk(
        request.match_info.get("index"),
        body,
        _stored_documents(request),
        services.identity.for_caller(request.headers),
    )
    return await _forward_write(request, body, enriched)


async def _write_body(request: web.Request) -> bytes:
    """The write's body as the write path reads it: aiohttp has inflated a gzip- or
    deflate-encoded one already."""
    settings = request.app[SERVICES].settings
    return await proxy.read_body(request, settings.max_body_bytes, settings.client_body_timeout_s)


async def _forward_write(
    request: web.Request, body: bytes, enriched: bytes | None
) -> web.StreamResponse:
    """Forward the enriched body, or the body as it came when nothing was added."""
    return await forward_upstream(request, body if enriched is None else enriched)


def _stored_documents(request: web.Request) -> Fetch:
    """Reads stored documents for partial updates with the caller's own identity."""
    services = request.app[SERVICES]

    async def fetch(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        answer = await proxy.fetch_json(
            request,
            services.upstream.transport,
            services.identity,
            "POST",
            "/_mget",
            {"docs": docs},
        )
        found = answer.get("docs")
        if not (isinstance(found, list) and len(found) == len(docs)):
            raise ApiError(502, "upstream_error", "OpenSearch answered _mget with no docs")
        return found

    return fetch
