"""HTTP routes: the route table and the edge middleware; health, the native `/v1/search` and the
profile endpoint. The `_search` interception (intercept.py) and writes (writes.py) have modules
of their own; pass-through gets everything else (registered last, so only what nothing matched)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from aiohttp import hdrs, web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from sidecar.api import proxy
from sidecar.api.errors import ApiError, MethodNotAllowed, error_response, rejection_reason
from sidecar.api.intercept import intercept_search
from sidecar.api.responses import (
    ROUTE_LABEL,
    finite,
    forward_upstream,
    json_response,
    rerank_report,
)
from sidecar.api.schemas import check_json_media_type, parse_json_object, parse_search_request
from sidecar.api.writes import write_bulk, write_document, write_update
from sidecar.logging import request_id_var
from sidecar.pipeline import RankedHit, SearchResult
from sidecar.retrieval.fusion import SourceRank
from sidecar.services import SERVICES

_REQUEST_ID_MAX_CHARS = 128


# Route label of each path pattern, for metrics (a small fixed set: never the raw path).
_ROUTE_LABELS = {
    "/healthz": "health",
    "/readyz": "health",
    "/metrics": "metrics",
    "/v1/search": "search",
    "/v1/indexes/{index}/profile": "profile",
    "/_search": "intercept",
    "/{index}/_search": "intercept",
    "/{index}/_doc": "write",
    "/{index}/_doc/{id}": "write",
    "/{index}/_create/{id}": "write",
    "/{index}/_update/{id}": "write",
    "/_bulk": "write",
    "/{index}/_bulk": "write",
}


# The app that serves /metrics on SIDECAR_METRICS_PORT, when the operator gives it its own port.
METRICS_APP = web.AppKey("metrics_app", web.Application)


def add_routes(
    app: web.Application, registry: CollectorRegistry, metrics_port: int | None = None
) -> None:
    """The route table. With `metrics_port`, /metrics is not on the main listener: it is served
    by `app[METRICS_APP]`, which `serve` starts on that port (scrapers reach it; the clients of
    the main port do not)."""
    if metrics_port is None:
        _add_own_path(app, "GET", "/metrics", make_aiohttp_handler(registry))
    else:
        app[METRICS_APP] = web.Application()
        _add_own_path(app[METRICS_APP], "GET", "/metrics", make_aiohttp_handler(registry))
    for method, path, handler in (
        ("GET", "/healthz", healthz),
        ("GET", "/readyz", readyz),
        ("POST", "/v1/search", native_search),
        ("GET", "/v1/indexes/{index}/profile", index_profile),
    ):
        _add_own_path(app, method, path, handler)
    for path in ("/_search", "/{index}/_search"):
        app.router.add_route("GET", path, intercept_search)
        app.router.add_route("POST", path, intercept_search)
    # Writes: other methods on these paths (GET, DELETE, HEAD) fall through to pass-through.
    for path in ("/{index}/_doc", "/{index}/_doc/{id}", "/{index}/_create/{id}"):
        for method in ("PUT", "POST"):
            app.router.add_route(method, path, write_document)
    app.router.add_route("POST", "/{index}/_update/{id}", write_update)
    for path in ("/_bulk", "/{index}/_bulk"):
        for method in ("PUT", "POST"):
            app.router.add_route(method, path, write_bulk)
    app.router.add_route("*", "/{tail:.*}", pass_through)


def _add_own_path(
    app: web.Application,
    method: str,
    path: str,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> None:
    """A path that only the sidecar has: `method` (GET with HEAD) goes to `handler`, any other
    gets a 405. Passed through, the cluster would answer "no handler found", a 400."""
    app.router.add_route(method, path, handler)
    if method == hdrs.METH_GET:
        app.router.add_route(hdrs.METH_HEAD, path, handler)
    app.router.add_route(hdrs.METH_ANY, path, method_not_allowed)


async def method_not_allowed(request: web.Request) -> web.StreamResponse:
    """Raises MethodNotAllowed with the methods the matched path takes."""
    routes = request.match_info.route.resource or ()
    allowed = sorted(route.method for route in routes if route.method != hdrs.METH_ANY)
    raise MethodNotAllowed(request.raw_path, request.method, allowed)


@web.middleware
async def edge(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Request id (honoured if the client sent a sane one, else generated), the error table, and
    the request metrics."""
    given = request.headers.get("X-Request-Id", "")
    request_id = (
        given
        if 0 < len(given) <= _REQUEST_ID_MAX_CHARS and given.isprintable()
        else uuid.uuid4().hex
    )
    token = request_id_var.set(request_id)
    metrics = request.app[SERVICES].pipeline.metrics
    metrics.inflight.inc()
    started = time.perf_counter()
    status = 500
    try:
        try:
            response = await handler(request)
        except Exception as error:
            refusal = _as_api_error(error) if isinstance(error, web.HTTPException) else error
            response = error_response(refusal)
            if (reason := rejection_reason(refusal)) is not None:
                metrics.rejected.labels(reason).inc()
        status = response.status
        if not response.prepared:
            response.headers["X-Request-Id"] = request_id
        return response
    finally:
        route = _route_label(request)
        metrics.requests.labels(route, str(status)).inc()
        metrics.request_duration.labels(route).observe(time.perf_counter() - started)
        metrics.inflight.dec()
        request_id_var.reset(token)


def _route_label(request: web.Request) -> str:
    if (label := request.get(ROUTE_LABEL)) is not None:
        return str(label)
    resource = request.match_info.route.resource
    return _ROUTE_LABELS.get(resource.canonical, "proxy") if resource is not None else "proxy"


def _as_api_error(error: web.HTTPException) -> ApiError:
    """aiohttp's own refusals (e.g. a body over client_max_size) in OpenSearch's error shape."""
    if error.status == 413:
        return ApiError(413, "content_too_long_exception", "request body is too large")
    return ApiError(error.status, "illegal_argument_exception", error.reason)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    upstream_ok = await services.upstream.reachable()
    body = {
        "ready": services.models_loaded and upstream_ok,
        "models_loaded": services.models_loaded,
        "upstream": upstream_ok,
    }
    return web.json_response(body, status=200 if body["ready"] else 503)


async def native_search(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    deadline = asyncio.get_running_loop().time() + services.settings.request_timeout_s
    check_json_media_type(request.headers.get("Content-Type"))
    body = parse_json_object(
        await proxy.read_body(
            request, services.settings.max_body_bytes, services.settings.client_body_timeout_s
        )
    )
    search = replace(
        parse_search_request(body, services.settings),
        caller_headers=services.identity.for_caller(request.headers),
    )
    result = await services.pipeline.search(search, deadline)
    answer: dict[str, Any] = {
        "took": round(result.timings.values_ms["total"]),
        "hits": [_native_hit(hit, search.explain) for hit in result.hits],
        "candidates": len(result.candidates),
        "candidate_sources": {
            source: sum(c.provenance == source for c in result.candidates)
            for source in ("both", "lexical_only", "vector_only")
        },
        "first_stage": _first_stage(result),
        "timings_ms": result.timings.values_ms,
        "rerank": rerank_report(result.rerank, services.settings.report_cache_stats),
    }
    if search.explain:
        # Each retriever's own ranked list, before fusion cut the union to `candidates`.
        answer["retrievers"] = {
            name: [{"index": hit.index, "id": hit.id, "score": finite(hit.score)} for hit in hits]
            for name, hits in (
                ("lexical", result.retrieved.lexical),
                ("vector", result.retrieved.vector),
            )
        }
    return json_response(answer)


async def pass_through(request: web.Request) -> web.StreamResponse:
    return await forward_upstream(request)


async def index_profile(request: web.Request) -> web.Response:
    """The effective profile of an index expression and where each part of it came from."""
    services = request.app[SERVICES]
    index = request.match_info["index"]
    profile = await services.pipeline.profiles.resolve(
        index, services.identity.for_caller(request.headers)
    )
    return json_response({"index": index, **profile.describe()})


def _first_stage(result: SearchResult) -> dict[str, Any]:
    profile = result.profile
    return {
        "profile": profile.name,
        "vector": profile.embedding,
        "lexical_only": profile.embedding == "none",
        "lexical_only_reason": profile.lexical_only_reason,
        # Set when `server` fusion failed for this caller and the sidecar fused instead.
        "fusion_fallback": result.retrieved.fusion_fallback,
    }


def _native_hit(hit: RankedHit, explain: bool) -> dict[str, Any]:
    candidate = hit.candidate
    entry: dict[str, Any] = {
        "index": candidate.index,
        "id": candidate.id,
        "score": finite(hit.score),
        "rerank_score": finite(hit.rerank_score),
        "first_stage": {
            "rank": hit.first_stage_rank,
            "score": finite(candidate.fused_score),
            "normalized": finite(hit.first_stage_normalized),
        },
        "sources": {
            "lexical": _source_rank(candidate.lexical),
            "vector": _source_rank(candidate.vector),
        },
        "source": candidate.source,
    }
    if hit.empty_text:
        entry["empty_text"] = True
    if hit.below_depth:
        entry["below_depth"] = True
    if explain:
        entry["explain"] = {"provenance": candidate.provenance}
    return entry


def _source_rank(rank: SourceRank | None) -> dict[str, Any] | None:
    return None if rank is None else {"rank": rank.rank, "score": finite(rank.score)}
