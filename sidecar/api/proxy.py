"""Pass-through: every request the sidecar does not handle goes to OpenSearch as it came, and the
answer comes back as OpenSearch gave it — status, headers and body bytes, streamed both ways,
with no size limit of the sidecar's own (the cluster's applies) and no read timeout shorter than
what the request asks the cluster to wait. Hop-by-hop headers are dropped, as any HTTP proxy
must; the caller's identity headers are what UpstreamIdentity lets through (Authorization in the
default `forward` mode); the caller's address is added to X-Forwarded-For and Forwarded."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import logging
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.api.errors import ApiError
from sidecar.logging import request_id_var
from sidecar.metrics import Metrics
from sidecar.retrieval.identity import UpstreamIdentity
from sidecar.retrieval.opensearch import CONNECTIONS_PER_NODE, UpstreamError, error_body

log = logging.getLogger(__name__)
_turns = itertools.count()

_CHUNK_BYTES = 64 * 1024
# RFC 9110 section 7.6.1 connection-specific headers, plus Host (set for the upstream by the client).
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)

# aiohttp adds these when the client did not send them; a proxy must not (an added
# Accept-Encoding would get the client a gzip body it never asked for).
_NEVER_ADDED = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})

# Nothing reached the node: the request may go to the next one, writes too.
_NOT_CONNECTED = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)

# Parameters with which a request asks the cluster to wait (cluster health's `wait_for_*` and
# `timeout`, `_tasks?wait_for_completion`, master elections), in OpenSearch's time units.
_WAIT_PARAMETERS = ("timeout", "master_timeout", "cluster_manager_timeout")
_TIME_UNITS_S = {
    "nanos": 1e-9,
    "micros": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
# What the cluster may take beyond the wait it was asked for, to answer it.
_WAIT_MARGIN_S = 10.0
_SOCK_CONNECT_S = 10.0


@dataclass(frozen=True)
class ForwardPolicy:
    """How the pass-through treats what it forwards (from Settings)."""

    # A body the sidecar has to read first (signed, compressed) may be no larger; a streamed one
    # has no limit here.
    max_body_bytes: int
    # Longest wait for the next piece of a request body the sidecar reads.
    body_timeout_s: float
    # Longest silence from the cluster, unless the request asks it to wait longer.
    idle_timeout_s: float
    # Keep the X-Forwarded-For and Forwarded a client sent (behind a proxy that sets them);
    # else they are replaced by the client's own address.
    trust_forwarded: bool = False


def create_session(
    timeout_s: float, ssl_context: ssl.SSLContext | None = None
) -> aiohttp.ClientSession:
    """The one upstream session: no automatic decompression (bodies pass byte-for-byte), a bounded
    wait for each read (the pass-through sets its own per request), no total timeout (large
    scrolls and bulk responses stream for long), and the cluster's TLS context."""
    return aiohttp.ClientSession(
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=_SOCK_CONNECT_S, sock_read=timeout_s
        ),
        connector=aiohttp.TCPConnector(
            limit=CONNECTIONS_PER_NODE, ssl=ssl_context if ssl_context else True
        ),
    )


async def read_body(request: web.Request, max_body_bytes: int, idle_timeout_s: float) -> bytes:
    """The whole request body, refusing more than `max_body_bytes` with 413, and a client that
    sends nothing more for `idle_timeout_s` with 408. aiohttp inflates a gzip- or
    deflate-encoded body as it is read; one that does not inflate is a 400."""
    if request.content_length is not None and request.content_length > max_body_bytes:
        raise _too_large(max_body_bytes)
    body = bytearray()
    try:
        while chunk := await _next_chunk(request, max_body_bytes + 1 - len(body), idle_timeout_s):
            body += chunk
            if len(body) > max_body_bytes:
                raise _too_large(max_body_bytes)
    except RequestPayloadError:
        encoding = request.headers.get("Content-Encoding")
        if encoding is None:
            raise
        raise ApiError(
            400, "parsing_exception", f"the request body is not valid {encoding} data"
        ) from None
    return bytes(body)


async def _next_chunk(request: web.Request, limit: int, idle_timeout_s: float) -> bytes:
    try:
        return await asyncio.wait_for(request.content.read(limit), idle_timeout_s)
    except TimeoutError:
        raise ApiError(
            408,
            "request_timeout_exception",
            f"the request body stopped arriving for {idle_timeout_s:g} s "
            "(SIDECAR_CLIENT_BODY_TIMEOUT_S)",
            {"Connection": "close"},
        ) from None


async def forward(
    request: web.Request,
    session: aiohttp.ClientSession,
    upstreams: Sequence[URL],
    identity: UpstreamIdentity,
    policy: ForwardPolicy,
    metrics: Metrics,
    body: bytes | None = None,
    added_headers: Mapping[str, str] | None = None,
) -> web.StreamResponse:
    """Send `request` to one of the cluster's nodes (`upstreams`, taken in turn) and stream the
    answer back. `body`: already read by the caller; `added_headers`: the sidecar's own, added
    to the answer.

    A body is streamed through unread, whatever its size (with its length, or chunked), except
    a signed one (the signature covers its hash) and a compressed one (aiohttp inflates what it
    reads, so it goes on inflated, without its Content-Encoding): those are read first, up to
    `policy.max_body_bytes`. A node that cannot be connected to is skipped for the next (nothing
    was sent, so writes too); a request that has reached a node is never sent to another.
    """
    if (
        body is None
        and request.can_read_body
        and (identity.signer is not None or "Content-Encoding" in request.headers)
    ):
        body = await read_body(request, policy.max_body_bytes, policy.body_timeout_s)
    headers = _forwarded(identity.pass_through(_end_to_end(request.headers)), request, policy)
    if body is not None:
        # Every body read here or by a caller came through aiohttp, which inflated it.
        headers.popall("Content-Encoding", None)
        headers["Content-Length"] = str(len(body))
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=_SOCK_CONNECT_S,
        sock_read=read_timeout_s(request.query, policy.idle_timeout_s),
    )
    nodes = in_turn(upstreams)
    for attempt, upstream in enumerate(nodes, start=1):
        target = URL(str(upstream).rstrip("/") + request.raw_path, encoded=True)
        sent = headers.copy()
        if identity.signer is not None:
            sent.update(identity.signer(request.method, str(target), body, headers))
        # A file-like payload: aiohttp writes large bytes in one blocking call otherwise.
        payload = (
            io.BytesIO(body)
            if body is not None
            else (request.content if request.can_read_body else None)
        )
        response: web.StreamResponse | None = None
        started = time.perf_counter()
        status = "error"
        try:
            async with session.request(
                request.method,
                target,
                headers=sent,
                data=payload,
                allow_redirects=False,
                skip_auto_headers=_NEVER_ADDED,
                timeout=timeout,
            ) as answer:
                status = str(answer.status)
                response = web.StreamResponse(status=answer.status, reason=answer.reason)
                response.headers.extend(_end_to_end(answer.headers))
                response.headers.update(added_headers or {})
                if (request_id := request_id_var.get()) is not None:
                    response.headers["X-Request-Id"] = request_id
                if answer.content_length is not None:
                    response.content_length = answer.content_length
                await response.prepare(request)
                async for chunk in answer.content.iter_chunked(_CHUNK_BYTES):
                    await response.write(chunk)
                await response.write_eof()
                return response
        except aiohttp.ClientConnectorCertificateError as error:
            log.warning("upstream TLS handshake failed: %s", error)
            raise tls_refused() from error
        except _NOT_CONNECTED as error:
            log.warning("cannot connect to OpenSearch node %s: %s", upstream, error)
            if attempt < len(nodes):
                metrics.upstream_failover.labels("proxy").inc()
                continue
            raise ApiError(502, "upstream_unreachable", "OpenSearch is unreachable") from error
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as error:
            # ClientPayloadError: the cluster closed or reset the connection inside the body.
            log.warning("upstream request failed: %s", error)
            if response is not None and response.prepared:
                # The status line is gone already; cutting the body short is all that is left.
                if request.transport is not None:
                    request.transport.close()
                return response
            raise _upstream_failed(error) from error
        finally:
            metrics.upstream_requests.labels(status).inc()
            metrics.upstream_duration.labels("proxy").observe(time.perf_counter() - started)
    raise ApiError(502, "upstream_unreachable", "no OpenSearch node is configured")


def read_timeout_s(query: Mapping[str, str], idle_timeout_s: float) -> float | None:
    """The longest silence from the cluster a pass-through request waits out: `idle_timeout_s`,
    or what the request asks the cluster to wait (`timeout`, `master_timeout`,
    `cluster_manager_timeout`) plus a margin when that is longer; None (no limit) when it asks
    to wait without one (-1). A value the cluster cannot parse is left to it to refuse."""
    longest_s = idle_timeout_s
    for name in _WAIT_PARAMETERS:
        value = query.get(name, "").strip().lower()
        if value == "-1":
            return None
        number = value.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = _TIME_UNITS_S.get(value[len(number) :])
        try:
            asked_s = float(number) * unit if unit is not None else None
        except ValueError:
            asked_s = None
        if asked_s is not None and asked_s + _WAIT_MARGIN_S > longest_s:
            longest_s = asked_s + _WAIT_MARGIN_S
    return longest_s


def _forwarded(
    headers: CIMultiDict[str], request: web.Request, policy: ForwardPolicy
) -> CIMultiDict[str]:
    """`headers` with the caller's address appended to X-Forwarded-For and Forwarded (RFC 7239);
    what the caller sent in them is kept only when the operator trusts what is in front of the
    sidecar, since a client could otherwise claim any address to the cluster's audit log."""
    chain = headers.getall("X-Forwarded-For", []) if policy.trust_forwarded else []
    forwarded = headers.getall("Forwarded", []) if policy.trust_forwarded else []
    headers.popall("X-Forwarded-For", None)
    headers.popall("Forwarded", None)
    peer = request.remote
    if peer:
        chain.append(peer)
        node = f'"[{peer}]"' if ":" in peer else peer
        forwarded.append(f"for={node};proto={request.scheme}")
    if chain:
        headers["X-Forwarded-For"] = ", ".join(chain)
    if forwarded:
        headers["Forwarded"] = ", ".join(forwarded)
    return headers


def in_turn(upstreams: Sequence[URL]) -> list[URL]:
    """The nodes starting from the next one in turn, so that requests spread over them."""
    start = next(_turns) % len(upstreams) if upstreams else 0
    return [*upstreams[start:], *upstreams[:start]]


async def fetch_json(
    request: web.Request,
    session: aiohttp.ClientSession,
    upstreams: Sequence[URL],
    identity: UpstreamIdentity,
    metrics: Metrics,
    method: str,
    path: str,
    body: Any,
) -> dict[str, Any]:
    """A JSON read made upstream on the caller's behalf, with the caller's identity: what it
    returns is what the caller may see. A node that cannot be connected to is skipped for the
    next. Raises ApiError 502 when no node answers, UpstreamError when the cluster refuses."""
    headers = identity.pass_through(_end_to_end(request.headers))
    for name in ("Content-Length", "Content-Encoding", "Content-Type", "Accept-Encoding"):
        headers.popall(name, None)
    headers["Content-Type"] = "application/json"
    # The session does not inflate answers (pass-through bodies stay byte-for-byte): ask for none.
    headers["Accept-Encoding"] = "identity"
    sent = json.dumps(body).encode()
    nodes = in_turn(upstreams)
    for attempt, upstream in enumerate(nodes, start=1):
        target = URL(str(upstream).rstrip("/") + path)
        signed = headers.copy()
        if identity.signer is not None:
            signed.update(identity.signer(method, str(target), sent, headers))
        started = time.perf_counter()
        status = "error"
        try:
            async with session.request(
                method, target, headers=signed, data=sent, allow_redirects=False
            ) as answer:
                status = str(answer.status)
                payload = await answer.read()
                return _json_answer(answer, payload)
        except _NOT_CONNECTED as error:
            if attempt < len(nodes):
                metrics.upstream_failover.labels("fetch").inc()
                continue
            raise ApiError(502, "upstream_unreachable", "OpenSearch is unreachable") from error
        except (aiohttp.ClientConnectionError, TimeoutError) as error:
            raise _upstream_failed(error) from error
        finally:
            metrics.upstream_requests.labels(status).inc()
            metrics.upstream_duration.labels("fetch").observe(time.perf_counter() - started)
    raise ApiError(502, "upstream_unreachable", "no OpenSearch node is configured")


def _json_answer(answer: aiohttp.ClientResponse, payload: bytes) -> dict[str, Any]:
    """The cluster's JSON answer, or its refusal as an UpstreamError (challenge included)."""
    challenge = answer.headers.get("WWW-Authenticate")
    relayed = {"WWW-Authenticate": challenge} if challenge else {}
    try:
        decoded: dict[str, Any] = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        if answer.status < 400:
            raise ApiError(502, "upstream_error", "OpenSearch answered with no JSON") from None
        text = payload.decode(errors="replace")
        raise UpstreamError(
            answer.status,
            error_body(answer.status, "upstream_error", text),
            headers=relayed,
            text=text,
        ) from None
    if answer.status >= 400:
        raise UpstreamError(answer.status, decoded, headers=relayed)
    return decoded


def _upstream_failed(error: Exception) -> ApiError:
    """A request sent that got no (whole) answer: 504 when the node went quiet for longer than
    SIDECAR_UPSTREAM_TIMEOUT_S, 502 when the connection broke."""
    if isinstance(error, TimeoutError):
        return ApiError(504, "timeout_exception", "OpenSearch did not answer in time")
    return ApiError(502, "upstream_unreachable", "OpenSearch is unreachable")


def tls_refused() -> ApiError:
    """The answer when OpenSearch's certificate is not trusted (a configuration problem)."""
    return ApiError(
        502,
        "upstream_tls_error",
        "OpenSearch's TLS certificate could not be verified; set SIDECAR_UPSTREAM_CA_CERTS to the "
        "cluster's CA bundle",
    )


def _end_to_end(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """`headers` less the hop-by-hop ones, including any the Connection header names."""
    named = {
        token.strip().lower()
        for value in headers.getall("Connection", [])
        for token in value.split(",")
    }
    kept: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in _HOP_BY_HOP and name.lower() not in named:
            kept.add(name, value)
    return kept


def _too_large(max_body_bytes: int) -> ApiError:
    return ApiError(
        413, "content_too_long_exception", f"request body is larger than {max_body_bytes} bytes"
    )
