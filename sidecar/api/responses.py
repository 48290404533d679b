"""How handlers answer: JSON bodies (scores kept finite), the rerank report, and forwarding a
request to OpenSearch."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from sidecar import jsonio
from sidecar.api import proxy
from sidecar.pipeline import RerankReport
from sidecar.services import SERVICES

# Set by a handler whose request ends up elsewhere than its route says (intercept -> proxy).
ROUTE_LABEL = web.RequestKey("route_label", str)


async def forward_upstream(
    request: web.Request, body: bytes | None = None, added_headers: Mapping[str, str] | None = None
) -> web.StreamResponse:
    """`request` to OpenSearch as it came, or with `body` (see proxy.forward)."""
    services = request.app[SERVICES]
    return await proxy.forward(
        request,
        services.upstream.transport,
        services.identity,
        services.forward_policy,
        body,
        added_headers,
    )


def rerank_report(report: RerankReport, cache_stats: bool) -> dict[str, Any]:
    """The rerank report callers see. `cache_hits` and `pairs_scored` are null unless the
    operator reports them (`cache_stats`): with a cache shared between callers, a hit says that
    someone else searched the same thing lately."""
    return {
        "applied": report.applied,
        "model": public_model_name(report.model),
        "device": report.device,
        "dtype": report.dtype,
        "cache_hits": report.cache_hits if cache_stats else None,
        "pairs_scored": report.pairs_scored if cache_stats else None,
        "fail_open": report.fail_open,
        "reason": report.reason,
        "empty_text": report.empty_text,
        "below_depth": report.below_depth,
    }


@functools.cache
def public_model_name(model: str) -> str:
    """What callers are told of the model: a Hub id as is, a local model by its folder's name
    only (its path says how the host is laid out)."""
    return Path(model).name if Path(model).exists() else model


def finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity: such scores are reported as null."""
    return value if value is not None and math.isfinite(value) else None


def json_response(body: dict[str, Any]) -> web.Response:
    """`body` as JSON, written fast (the native answer holds every hit's source)."""
    return web.Response(body=jsonio.dumps(body), content_type="application/json")
