"""The one table from failures to HTTP answers, all in OpenSearch's error shape."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from sidecar.pipeline import DeadlineExceeded, RerankUnavailable
from sidecar.rerank.batcher import Overloaded
from sidecar.retrieval.profiles import ProfileError
from sidecar.retrieval.transport import UpstreamError, error_body
from sidecar.write_path import EmbeddingFailed

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request the sidecar refuses; `reason` is shown to the client, so it never holds internals."""

    def __init__(
        self, status: int, error_type: str, reason: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.error_type = error_type
        self.reason = reason
        self.headers = headers or {}


class MethodNotAllowed(Exception):
    """A method that a path of the sidecar's own does not take; `uri` is the path and query as
    sent, `allowed` the methods it does take."""

    def __init__(self, uri: str, method: str, allowed: Sequence[str]) -> None:
        super().__init__(
            f"Incorrect HTTP method for uri [{uri}] and method [{method}], "
            f"allowed: [{', '.join(allowed)}]"
        )
        self.allowed = tuple(allowed)


def bad_request(reason: str) -> ApiError:
    return ApiError(400, "illegal_argument_exception", reason)


def error_response(error: Exception) -> web.Response:
    """The response for any exception reaching the edge; unexpected ones are logged as 500s."""
    if isinstance(error, UpstreamError) and error.text is not None:
        # The cluster's own plain-text answer (e.g. the security plugin's 401), as it sent it.
        return web.Response(text=error.text, status=error.status, headers=error.headers)
    status, body, headers = _classify(error)
    response = web.json_response(body, status=status, headers=headers)
    if headers.get("Connection") == "close":
        response.force_close()  # the rest of the request is not coming: let the client go
    return response


def rejection_reason(error: Exception) -> str | None:
    """The `sidecar_rejected_requests_total` reason for a refusal by the sidecar itself (errors
    relayed from OpenSearch are not the sidecar's rejections)."""
    if isinstance(error, Overloaded):
        return "overloaded"
    if isinstance(error, RerankUnavailable):
        return "fail_closed"
    if isinstance(error, ApiError) and error.status == 413:
        return "too_large"
    if isinstance(error, ApiError) and 400 <= error.status < 500:
        return "bad_request"
    if isinstance(error, MethodNotAllowed):
        return "bad_request"
    if isinstance(error, ProfileError):
        return "bad_request"
    return None


def _classify(error: Exception) -> tuple[int, dict[str, Any], dict[str, str]]:
    if isinstance(error, ApiError):
        return error.status, error_body(error.status, error.error_type, error.reason), error.headers
    if isinstance(error, UpstreamError):
        return error.status, error.body, error.headers
    if isinstance(error, MethodNotAllowed):
        # As OpenSearch answers a wrong method: the message as a plain string, not an object.
        return 405, {"error": str(error), "status": 405}, {"Allow": ",".join(error.allowed)}
    if isinstance(error, ProfileError):
        return 400, error_body(400, "illegal_argument_exception", str(error)), {}
    if isinstance(error, EmbeddingFailed):
        reason = f"{error}; the write was not forwarded, nothing was stored"
        return 503, error_body(503, "embedding_exception", reason), {}
    if isinstance(error, Overloaded):
        retry_after = str(max(1, round(error.retry_after_s)))
        reason = "the reranker queue is full; retry later"
        return (
            429,
            error_body(429, "rejected_execution_exception", reason),
            {"Retry-After": retry_after},
        )
    if isinstance(error, DeadlineExceeded):
        reason = (
            f"the request did not finish within its time budget (SIDECAR_REQUEST_TIMEOUT_S); "
            f"the {error.stage} stage was still running"
        )
        return 504, error_body(504, "timeout_exception", reason), {}
    if isinstance(error, RerankUnavailable):
        reason = f"reranking unavailable ({error.reason}) and the sidecar is configured fail-closed"
        return 503, error_body(503, "rerank_unavailable_exception", reason), {}
    log.error("unhandled error", exc_info=error)
    return 500, error_body(500, "internal_error", "internal error; see the sidecar log"), {}
