"""The OpenSearch-compatible `_search` interception: a `_search` whose body carries `ext.rerank` runs
the caller's own query upstream and is reranked; any other `_search` passes through untouched."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from sidecar.api import proxy
from sidecar.api.errors import bad_request
from sidecar.api.filter_path import apply_filter_path, parse_filter_path
from sidecar.api.responses import (
    ROUTE_LABEL,
    finite,
    forward_upstream,
    json_response,
    rerank_report,
)
from sidecar.api.schemas import is_json_media_type, load_json, parse_rerank_ext
from sidecar.logging import log_stage
from sidecar.pipeline import Timings, within
from sidecar.retrieval.fusion import Candidate
from sidecar.retrieval.profiles import ProfileError, read_text
from sidecar.services import SERVICES

# On a `_search` with `ext.rerank` that the cluster answered unreranked: the reason.
SKIPPED_HEADER = "X-Sidecar-Rerank-Skipped"


async def intercept_search(request: web.Request) -> web.StreamResponse:
    """`_search` with `ext.rerank` is reranked; any other `_search` passes through untouched."""
    services = request.app[SERVICES]
    settings = services.settings
    raw = (
        await proxy.read_body(request, settings.max_body_bytes, settings.client_body_timeout_s)
        if request.can_read_body
        else b""
    )
    body: Any = None
    # Any other media type the cluster refuses (406) or reads its own way.
    if is_json_media_type(request.headers.get("Content-Type")) and _may_name_rerank(raw):
        # A duplicate key or an overlong number is refused here with OpenSearch's own message (the
        # cluster itself answers an overlong number with a 500); a body it cannot parse, OpenSearch
        # answers itself, in its own words.
        with contextlib.suppress(UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            body = load_json(raw)
    ext = body.get("ext") if isinstance(body, dict) else None
    if not (isinstance(body, dict) and isinstance(ext, dict) and "rerank" in ext):
        request[ROUTE_LABEL] = "proxy"
        return await forward_upstream(request, raw)
    if (reason := _not_rerankable(body, request.query)) is not None:
        # A response of another shape than the reranker writes: the cluster answers the request
        # itself, without `ext.rerank`, and the caller is told why.
        request[ROUTE_LABEL] = "proxy"
        services.pipeline.metrics.rerank_skipped.labels(reason).inc()
        return await forward_upstream(
            request,
            json.dumps(_without_rerank_ext(body, ext)).encode(),
            {SKIPPED_HEADER: f"{reason}: the cluster's own answer, not reranked"},
        )

    started = time.perf_counter()
    deadline = asyncio.get_running_loop().time() + settings.request_timeout_s
    rerank_ext = parse_rerank_ext(ext["rerank"], settings)
    params = dict(request.query)
    try:
        # Applied here to the reranked answer: upstream must return every hit whole.
        filter_path = parse_filter_path(params.pop("filter_path", ""))
    except ValueError as error:
        raise bad_request(str(error)) from None
    offset = _non_negative(body, params, "from", 0)
    size = _non_negative(body, params, "size", 10)
    if offset + size > rerank_ext.window:
        raise bad_request(
            f"[from] + [size] ({offset + size}) must not exceed [ext.rerank.window] ({rerank_ext.window})"
        )
    services.pipeline.check_admission(rerank_ext.window)
    index = request.match_info.get("index")
    caller = services.identity.for_caller(request.headers)
    try:
        profile = await within(
            deadline,
            "retrieve",
            services.pipeline.profiles.resolve(index or "_all", caller, need_vector=False),
            services.pipeline.metrics,
        )
        document_fields = rerank_ext.document_fields or profile.document_fields
        max_chars = profile.max_chars_per_field
    except ProfileError:
        # No profile can be made (e.g. no text field is mapped): the request's own fields do.
        if rerank_ext.document_fields is None:
            raise
        document_fields, max_chars = rerank_ext.document_fields, None
    upstream_body = _without_rerank_ext(body, ext)
    upstream_body.update(size=rerank_ext.window, **{"from": 0})
    # The reranker reads the document fields whatever `_source` the caller asked for: they come
    # back under each hit's `fields`, and are taken out again before the caller sees the hits.
    asked_fields = body.get("fields")
    added_fields: list[str] = []
    if asked_fields is None or isinstance(asked_fields, list):
        named = {f for f in asked_fields or [] if isinstance(f, str)}
        added_fields = [f for f in document_fields if f not in named]
        upstream_body["fields"] = [*(asked_fields or []), *added_fields]
    timings = Timings(services.pipeline.metrics)
    stage = time.perf_counter()
    response = await within(
        deadline,
        "retrieve",
        services.upstream.search(index, upstream_body, params, headers=caller),
        services.pipeline.metrics,
    )
    log_stage(
        "retrieve", timings.record("retrieve", stage), candidates=len(response["hits"]["hits"])
    )
    original = response["hits"]["hits"]
    candidates = [
        Candidate(
            index=hit["_index"],
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
        rerank_ext.truncation,
        deadline,
        timings,
        depth=rerank_ext.rerank_depth,
        caller=caller,
    )
    caller_patterns = [f for f in asked_fields or [] if isinstance(f, str)]
    page = ranked[offset : offset + size]
    hits = []
    for hit in page:
        entry = _without_fields(original[hit.first_stage_rank - 1], added_fields, caller_patterns)
        entry["_rerank"] = {
            "first_stage_score": entry.get("_score"),
            "first_stage_rank": hit.first_stage_rank,
            "rerank_score": finite(hit.rerank_score),
        }
        if hit.empty_text:
            entry["_rerank"]["empty_text"] = True
        if hit.below_depth:
            entry["_rerank"]["below_depth"] = True
        entry["_score"] = finite(hit.score)
        hits.append(entry)
    response["hits"]["hits"] = hits
    response["hits"]["max_score"] = max(
        (h["_score"] for h in hits if h["_score"] is not None), default=None
    )
    total_s = timings.record("total", started)
    log_stage("total", total_s, hits=len(hits))
    response["took"] = round(total_s * 1000)
    response.setdefault("ext", {})["rerank"] = rerank_report(report, settings.report_cache_stats)
    return json_response(apply_filter_path(response, filter_path))


def _may_name_rerank(raw: bytes) -> bool:
    """Whether `raw` may hold a `rerank` key: spelled out, possibly spelled with a JSON `\\u`
    escape, or in UTF-16 or UTF-32 (which JSON parsers also read; either puts a NUL byte in the
    first four). A scan costs far less than a parse, which most searches (not reranked) skip."""
    # A lone backslash is looked for first: one byte is found many times faster than two.
    return b"rerank" in raw or (b"\\" in raw and b"\\u" in raw) or b"\x00" in raw[:4]


def _without_rerank_ext(body: dict[str, Any], ext: dict[str, Any]) -> dict[str, Any]:
    """The caller's search as the cluster gets it: `ext` without `rerank` (dropped if empty)."""
    upstream = {key: value for key, value in body.items() if key != "ext"}
    if remaining := {key: value for key, value in ext.items() if key != "rerank"}:
        upstream["ext"] = remaining
    return upstream


def _not_rerankable(body: dict[str, Any], params: Mapping[str, str]) -> str | None:
    """Why a `_search` with `ext.rerank` cannot be reranked, if it cannot: the parameter that
    asks for an answer in another shape (not JSON, scrolled, or hits without ids)."""
    if params.get("format", "json") != "json":
        return "format"
    if "scroll" in params:
        return "scroll"
    if "_none_" in (params.get("stored_fields"), body.get("stored_fields")):
        return "stored_fields"
    return None


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


def _non_negative(body: dict[str, Any], params: dict[str, str], key: str, default: int) -> int:
    """`from`/`size` of the caller's page: the URL parameter wins over the body, as in
    OpenSearch. The parameter is taken out of `params`: upstream gets the whole window."""
    if key in params:
        text = params.pop(key)
        if not text.isdigit():
            raise bad_request(f"[{key}] must be a non-negative integer, got {text!r}")
        return int(text)
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise bad_request(f"[{key}] must be a non-negative integer")
    return value
