"""Pass-through: every request the sidecar does not handle goes to OpenSearch as it came, and the
answer comes back as OpenSearch gave it — status, headers and body bytes, streamed both ways,
with no size limit of the sidecar's own (the cluster's applies) and no read timeout shorter than
what the request asks the cluster to wait. Hop-by-hop headers are dropped, as any HTTP proxy
must; the caller's identity headers are what UpstreamIdentity lets through (Authorization in the
default `forward` mode); the caller's address is added to X-Forwarded-For and Forwarded."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.api.errors import ApiError
from sidecar.logging import request_id_var
from sidecar.retrieval.identity import UpstreamIdentity
from sidecar.retrieval.transport import Transport

log = logging.getLogger(__name__)

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
    transport: Transport,
    identity: UpstreamIdentity,
    policy: ForwardPolicy,
    body: bytes | None = None,
    added_headers: Mapping[str, str] | None = None,
) -> web.StreamResponse:
    """Send `request` to the cluster and stream the answer back. `body`: already read by the
    caller; `added_headers`: the sidecar's own, added to the answer.

    A body is streamed through unread, whatever its size (with its length, or chunked), except
    a signed one (the signature covers its hash) and a compressed one (aiohttp inflates what it
    reads, so it goes on inflated, without its Content-Encoding): those are read first, up to
    `policy.max_body_bytes`. Which node, and what happens when one cannot be reached, is the
    transport's.
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
    async with transport.request(
        request.method,
        request.raw_path,
        kind="proxy",
        headers=headers,
        body=body if body is not None else (request.content if request.can_read_body else None),
        read_timeout_s=read_timeout_s(request.query, policy.idle_timeout_s),
    ) as answer:
        if _small(request, answer):
            return await _whole(request, answer, added_headers)
        response = web.StreamResponse(status=answer.status, reason=answer.reason)
        _relay_headers(response, answer, added_headers)
        if answer.content_length is not None:
            response.content_length = answer.content_length
        await response.prepare(request)
        try:
            async for chunk in answer.content.iter_chunked(_CHUNK_BYTES):
                await response.write(chunk)
            await response.write_eof()
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as error:
            # ClientPayloadError: the cluster closed or reset the connection inside the body.
            # The status line is gone already; cutting the body short is all that is left.
            log.warning("upstream answer broke off: %s", error)
            if request.transport is not None:
                request.transport.close()
    return response


def _small(request: web.Request, answer: aiohttp.ClientResponse) -> bool:
    """An answer of one chunk at most, with its length, that arrived whole with its headers:
    relayed in one write (a stream writes the status line, headers and body apart, three system
    calls where one will do). One still arriving streams, so a slow cluster's first bytes reach
    the client as they come. HEAD and bodiless statuses keep the stream's path, which relays
    their Content-Length as is."""
    return (
        answer.content_length is not None
        and answer.content_length <= _CHUNK_BYTES
        and answer.content.total_bytes >= answer.content_length
        and request.method != "HEAD"
        and answer.status not in (204, 304)
        and answer.status >= 200
    )


async def _whole(
    request: web.Request,
    answer: aiohttp.ClientResponse,
    added_headers: Mapping[str, str] | None,
) -> web.StreamResponse:
    try:
        body = await answer.read()
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as error:
        log.warning("upstream answer broke off: %s", error)
        raise ApiError(502, "upstream_unreachable", "OpenSearch is unreachable") from error
    response = web.Response(status=answer.status, reason=answer.reason, body=body)
    _relay_headers(response, answer, added_headers)
    return response


def _relay_headers(
    response: web.StreamResponse,
    answer: aiohttp.ClientResponse,
    added_headers: Mapping[str, str] | None,
) -> None:
    """The cluster's end-to-end headers, the sidecar's own, and the request id."""
    response.headers.extend(_end_to_end(answer.headers))
    response.headers.update(added_headers or {})
    if (request_id := request_id_var.get()) is not None:
        response.headers["X-Request-Id"] = request_id


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


async def fetch_json(
    request: web.Request,
    transport: Transport,
    identity: UpstreamIdentity,
    method: str,
    path: str,
    body: Any,
) -> Any:
    """A JSON read made upstream on the caller's behalf, with the caller's headers and identity:
    what it returns is what the caller may see. Raises UpstreamError when no node answers or the
    cluster refuses."""
    headers = identity.pass_through(_end_to_end(request.headers))
    return await transport.json(method, path, kind="fetch", headers=headers, body=body)


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
