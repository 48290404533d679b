"""HTTP routes: health, the native `/v1/search`, the OpenSearch-compatible `_search` interception,
and pass-through for everything else (registered last, so it only gets what nothing else matched)."""

from __future__ import annotations

import asyncio
import fnmatch
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from sidecar.api import proxy
from sidecar.api.errors import ApiError, bad_request, error_response, rejection_reason
from sidecar.api.schemas import parse_json_object, parse_rerank_ext, parse_search_request
from sidecar.logging import log_stage, request_id_var
from sidecar.pipeline import RankedHit, RerankReport, Timings
from sidecar.retrieval.fusion import Candidate, SourceRank
from sidecar.retrieval.profiles import IndexProfile, ProfileError, read_text
from sidecar.services import Services
from sidecar.write_path import Fetch

SERVICES = web.AppKey("services", Services)
# Set by a handler whose request ends up elsewhere than its route says (intercept -> proxy).
ROUTE_LABEL = web.RequestKey("route_label", str)
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


def add_routes(app: web.Application, registry: CollectorRegistry) -> None:
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/v1/search", native_search)
    app.router.add_get("/v1/indexes/{index}/profile", index_profile)
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
    body = parse_json_object(await proxy.read_body(request, services.settings.max_body_bytes))
    search = parse_search_request(body, services.settings)
    result = await services.pipeline.search(search, deadline)
    answer: dict[str, Any] = {
        "took": round(result.timings.values_ms["total"]),
        "hits": [_native_hit(hit, search.explain) for hit in result.hits],
        "candidates": len(result.candidates),
        "candidate_sources": {
            source: sum(c.provenance == source for c in result.candidates)
            for source in ("both", "lexical_only", "vector_only")
        },
        "first_stage": _first_stage(result.profile),
        "timings_ms": result.timings.values_ms,
        "rerank": _report(result.rerank),
    }
    if search.explain:
        # Each retriever's own ranked list, before fusion cut the union to `candidates`.
        answer["retrievers"] = {
            name: [{"id": hit.id, "score": _finite(hit.score)} for hit in hits]
            for name, hits in (
                ("lexical", result.retrieved.lexical),
                ("vector", result.retrieved.vector),
            )
        }
    return _json(answer)


async def intercept_search(request: web.Request) -> web.StreamResponse:
    """`_search` with `ext.rerank` is reranked; any other `_search` passes through untouched."""
    services = request.app[SERVICES]
    settings = services.settings
    raw = await proxy.read_body(request, settings.max_body_bytes) if request.can_read_body else b""
    try:
        body = json.loads(raw) if raw else None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        body = None
    ext = body.get("ext") if isinstance(body, dict) else None
    if not (isinstance(body, dict) and isinstance(ext, dict) and "rerank" in ext):
        request[ROUTE_LABEL] = "proxy"
        return await proxy.forward(
            request,
            services.session,
            services.upstream_url,
            settings.max_body_bytes,
            services.pipeline.metrics,
            raw,
        )

    started = time.perf_counter()
    deadline = asyncio.get_running_loop().time() + settings.request_timeout_s
    rerank_ext = parse_rerank_ext(ext["rerank"], settings)
    offset, size = _non_negative(body, "from", 0), _non_negative(body, "size", 10)
    if offset + size > rerank_ext.window:
        raise bad_request(
            f"[from] + [size] ({offset + size}) must not exceed [ext.rerank.window] ({rerank_ext.window})"
        )
    index = request.match_info.get("index")
    try:
        profile = await services.pipeline.profiles.resolve(index or "_all", need_vector=False)
        document_fields = rerank_ext.document_fields or profile.document_fields
        max_chars = profile.max_chars_per_field
    except ProfileError:
        # No profile can be made (e.g. no text field is mapped): the request's own fields do.
        if rerank_ext.document_fields is None:
            raise
        document_fields, max_chars = rerank_ext.document_fields, None
    remaining_ext = {key: value for key, value in ext.items() if key != "rerank"}
    upstream_body = {key: value for key, value in body.items() if key != "ext"}
    upstream_body.update(size=rerank_ext.window, **{"from": 0})
    # The reranker reads the document fields whatever `_source` the caller asked for: they come
    # back under each hit's `fields`, and are taken out again before the caller sees the hits.
    asked_fields = body.get("fields")
    added_fields: list[str] = []
    if asked_fields is None or isinstance(asked_fields, list):
        named = {f for f in asked_fields or [] if isinstance(f, str)}
        added_fields = [f for f in document_fields if f not in named]
        upstream_body["fields"] = [*(asked_fields or []), *added_fields]
    if remaining_ext:
        upstream_body["ext"] = remaining_ext
    timings = Timings(services.pipeline.metrics)
    stage = time.perf_counter()
    response = await services.upstream.search(index, upstream_body, dict(request.query))
    log_stage(
        "retrieve", timings.record("retrieve", stage), candidates=len(response["hits"]["hits"])
    )
    original = response["hits"]["hits"]
    candidates = [
        Candidate(
            id=hit["_id"],
            source=hit.get("_source") or {},
            fused_score=float(hit["_score"]) if isinstance(hit.get("_score"), int | float) else 0.0,
            lexical=None,
            vector=None,
        )
        for hit in original
    ]
    texts = [_hit_text(hit, document_fields, max_chars) for hit in original]
    ranked, report = await services.pipeline.rerank(
        rerank_ext.query_text,
        candidates,
        texts,
        offset + size,
        True,
        settings.truncation,
        deadline,
        timings,
    )
    caller_patterns = [f for f in asked_fields or [] if isinstance(f, str)]
    page = ranked[offset : offset + size]
    hits = []
    for hit in page:
        entry = _without_fields(original[hit.first_stage_rank - 1], added_fields, caller_patterns)
        entry["_rerank"] = {
            "first_stage_score": entry.get("_score"),
            "first_stage_rank": hit.first_stage_rank,
            "rerank_score": _finite(hit.rerank_score),
        }
        if hit.empty_text:
            entry["_rerank"]["empty_text"] = True
        entry["_score"] = _finite(hit.score)
        hits.append(entry)
    response["hits"]["hits"] = hits
    response["hits"]["max_score"] = max(
        (h["_score"] for h in hits if h["_score"] is not None), default=None
    )
    total_s = timings.record("total", started)
    log_stage("total", total_s, hits=len(hits))
    response["took"] = round(total_s * 1000)
    response.setdefault("ext", {})["rerank"] = _report(report)
    return _json(response)


def _hit_text(hit: dict[str, Any], document_fields: tuple[str, ...], max_chars: int | None) -> str:
    """What the reranker reads of an intercepted hit: each field from the hit's `fields` (what
    OpenSearch retrieved for it), else from its `_source`."""
    fields, source = hit.get("fields"), hit.get("_source")
    fields = fields if isinstance(fields, dict) else {}
    source = source if isinstance(source, dict) else {}
    return " ".join(
        text
        for name in document_fields
        if (text := read_text(fields if name in fields else source, [name], max_chars))
    )


def _without_fields(
    hit: dict[str, Any], added: list[str], caller_patterns: list[str]
) -> dict[str, Any]:
    """The hit as the caller's own request would have returned it: without the `fields` entries
    the sidecar asked for (unless one of the caller's own `fields` patterns names them)."""
    entry = dict(hit)
    fields = entry.get("fields")
    if not added or not isinstance(fields, dict):
        return entry
    kept = {
        name: value
        for name, value in fields.items()
        if name not in added or any(fnmatch.fnmatchcase(name, p) for p in caller_patterns)
    }
    if kept:
        entry["fields"] = kept
    else:
        del entry["fields"]
    return entry


async def write_document(request: web.Request) -> web.StreamResponse:
    """`_doc`/`_create`: the document gets its vector if its index embeds on write."""
    body = await _write_body(request)
    enriched = await request.app[SERVICES].writes.document(request.match_info["index"], body)
    return await _forward_write(request, body, enriched)


async def write_update(request: web.Request) -> web.StreamResponse:
    """`_update`: its `doc`/`upsert` get their vector if the index embeds on write."""
    services = request.app[SERVICES]
    body = await _write_body(request)
    enriched = await services.writes.update(
        request.match_info["index"],
        request.match_info["id"],
        request.query.get("routing"),
        body,
        _stored_documents(request),
    )
    return await _forward_write(request, body, enriched)


async def write_bulk(request: web.Request) -> web.StreamResponse:
    """`_bulk`: documents bound for embed-on-write indexes get their vectors, in batches."""
    services = request.app[SERVICES]
    body = await _write_body(request)
    enriched = await services.writes.bulk(
        request.match_info.get("index"), body, _stored_documents(request)
    )
    return await _forward_write(request, body, enriched)


async def _write_body(request: web.Request) -> bytes:
    """The write's body as the write path reads it: aiohttp has inflated a gzip- or
    deflate-encoded one already."""
    return await proxy.read_body(request, request.app[SERVICES].settings.max_body_bytes)


async def _forward_write(
    request: web.Request, body: bytes, enriched: bytes | None
) -> web.StreamResponse:
    """Forward the enriched body, or the body as it came when nothing was added; either way
    inflated, so without the Content-Encoding it came in."""
    services = request.app[SERVICES]
    return await proxy.forward(
        request,
        services.session,
        services.upstream_url,
        services.settings.max_body_bytes,
        services.pipeline.metrics,
        body if enriched is None else enriched,
        decoded="Content-Encoding" in request.headers,
    )


def _stored_documents(request: web.Request) -> Fetch:
    """Reads stored documents for partial updates with the caller's own identity."""
    services = request.app[SERVICES]

    async def fetch(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        answer = await proxy.fetch_json(
            request,
            services.session,
            services.upstream_url,
            services.pipeline.metrics,
            "POST",
            "/_mget",
            {"docs": docs},
        )
        found = answer.get("docs")
        if not (isinstance(found, list) and len(found) == len(docs)):
            raise ApiError(502, "upstream_error", "OpenSearch answered _mget with no docs")
        return found

    return fetch


async def pass_through(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    return await proxy.forward(
        request,
        services.session,
        services.upstream_url,
        services.settings.max_body_bytes,
        services.pipeline.metrics,
    )


async def index_profile(request: web.Request) -> web.Response:
    """The effective profile of an index expression and where each part of it came from."""
    services = request.app[SERVICES]
    index = request.match_info["index"]
    profile = await services.pipeline.profiles.resolve(index)
    return _json({"index": index, **profile.describe()})


def _first_stage(profile: IndexProfile) -> dict[str, Any]:
    return {
        "profile": profile.name,
        "vector": profile.embedding,
        "lexical_only": profile.embedding == "none",
        "lexical_only_reason": profile.lexical_only_reason,
    }


def _native_hit(hit: RankedHit, explain: bool) -> dict[str, Any]:
    candidate = hit.candidate
    entry: dict[str, Any] = {
        "id": candidate.id,
        "score": _finite(hit.score),
        "rerank_score": _finite(hit.rerank_score),
        "first_stage": {
            "rank": hit.first_stage_rank,
            "score": _finite(candidate.fused_score),
            "normalized": _finite(hit.first_stage_normalized),
        },
        "sources": {
            "lexical": _source_rank(candidate.lexical),
            "vector": _source_rank(candidate.vector),
        },
        "source": candidate.source,
    }
    if hit.empty_text:
        entry["empty_text"] = True
    if explain:
        entry["explain"] = {"provenance": candidate.provenance}
    return entry


def _source_rank(rank: SourceRank | None) -> dict[str, Any] | None:
    return None if rank is None else {"rank": rank.rank, "score": _finite(rank.score)}


def _report(report: RerankReport) -> dict[str, Any]:
    return {
        "applied": report.applied,
        "model": report.model,
        "device": report.device,
        "dtype": report.dtype,
        "cache_hits": report.cache_hits,
        "pairs_scored": report.pairs_scored,
        "fail_open": report.fail_open,
        "reason": report.reason,
        "empty_text": report.empty_text,
    }


def _finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity: such scores are reported as null."""
    return value if value is not None and math.isfinite(value) else None


def _non_negative(body: dict[str, Any], key: str, default: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise bad_request(f"[{key}] must be a non-negative integer")
    return value


def _json(body: dict[str, Any]) -> web.Response:
    return web.Response(
        body=json.dumps(body, allow_nan=False).encode(), content_type="application/json"
    )
