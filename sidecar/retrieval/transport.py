"""The one connection to the cluster on the request path: the pass-through, the first stage, mapping
reads and the reads made for writes all go through one aiohttp session, one node rotation, one
failover and outlier policy and one error mapping.

A request goes to the next node in turn. A node that cannot be connected to (refused, reset, or
no handshake within the connect timeout) is skipped for the next one: nothing reached it, so any
request, a write too, may go on. A request that reached a node is never sent to another, and an
answer the cluster gave, an error too, is relayed as it is: sent again it would double the load
that caused it, or apply a write twice.

A node that fails to answer (no connection, or silence until the read timeout) is ejected: taken
out of the rotation and probed in the background (`HEAD /`, any HTTP answer will do) at growing
intervals until it answers, so a blackholed node costs one timeout, not one per round (Envoy's
passive outlier detection; Elasticsearch's clients mark a node dead the same way). When every node
is ejected all are tried, since the cluster may be back before a probe says so."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from sidecar import jsonio
from sidecar.metrics import Metrics
from sidecar.retrieval.identity import Signer

log = logging.getLogger(__name__)

# Connections kept to each node: a pass-through streams one per request, `server` fusion holds
# several per search.
CONNECTIONS_PER_NODE = 256
CONNECT_TIMEOUT_S = 10.0
# The first probe of an ejected node follows this soon, each later one twice as late, up to the
# longest interval.
PROBE_INTERVAL_S = 1.0
LONGEST_PROBE_INTERVAL_S = 30.0

# aiohttp adds these when the caller did not send them; a proxy must not (an added
# Accept-Encoding would get the client a gzip body it never asked for).
_NEVER_ADDED = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})

# Nothing reached the node: the request may go to the next one, writes too.
_NOT_CONNECTED = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


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


def unreachable() -> UpstreamError:
    return UpstreamError(502, error_body(502, "upstream_unreachable", "OpenSearch is unreachable"))


def tls_refused() -> UpstreamError:
    """The answer when OpenSearch's certificate is not trusted (a configuration problem)."""
    reason = (
        "OpenSearch's TLS certificate could not be verified; set SIDECAR_UPSTREAM_CA_CERTS to the "
        "cluster's CA bundle"
    )
    return UpstreamError(502, error_body(502, "upstream_tls_error", reason))


def no_answer(error: Exception) -> UpstreamError:
    """A request sent that got no (whole) answer: 504 when the node went quiet for longer than
    its read timeout, 502 when the connection broke."""
    if isinstance(error, TimeoutError):
        return UpstreamError(
            504, error_body(504, "upstream_timeout", "OpenSearch did not answer in time")
        )
    return unreachable()


@dataclass
class Node:
    url: URL
    # host:port, the node's metric label (a URL with credentials is refused at start).
    label: str
    # Ejected: out of the rotation until `probe` sees it answer.
    probe: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def ejected(self) -> bool:
        return self.probe is not None


class Transport:
    """Calls carry the headers their caller gives (identity included); with a `signer` (SigV4,
    the sidecar's own AWS identity) every request is signed as it is sent to a node."""

    def __init__(
        self,
        urls: Sequence[str],
        read_timeout_s: float,
        metrics: Metrics,
        *,
        ssl_context: ssl.SSLContext | None = None,
        signer: Signer | None = None,
        probe_headers: Mapping[str, str] | None = None,
        probe_interval_s: float = PROBE_INTERVAL_S,
    ) -> None:
        self.nodes = [Node(URL(url), f"{URL(url).host}:{URL(url).port}") for url in urls]
        self._read_timeout_s = read_timeout_s
        self._metrics = metrics
        self._signer = signer
        self._probe_headers = dict(probe_headers or {})
        self._probe_interval_s = probe_interval_s
        self._turns = itertools.count()
        self._session: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        for node in self.nodes:
            # Every node's series exists from the start, at zero: a rate over it has data.
            metrics.upstream_node_ejected.labels(node.label).set(0)
            metrics.upstream_ejections.labels(node.label)

    @property
    def session(self) -> aiohttp.ClientSession:
        """One session per process, made on first use (it needs the running loop): no automatic
        decompression (bodies pass byte-for-byte), a bounded wait for each read, no total
        timeout (large scrolls and bulk answers stream for long), a pool per node."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=self._read_timeout_s
                ),
                connector=aiohttp.TCPConnector(
                    limit=CONNECTIONS_PER_NODE * max(1, len(self.nodes)),
                    limit_per_host=CONNECTIONS_PER_NODE,
                    ssl=self._ssl,
                ),
            )
        return self._session

    async def close(self) -> None:
        for node in self.nodes:
            if node.probe is not None:
                node.probe.cancel()
        if self._session is not None:
            await self._session.close()

    def in_turn(self) -> list[Node]:
        """The nodes in the rotation, starting from the next in turn; every node when all are
        ejected."""
        healthy = [node for node in self.nodes if not node.ejected] or self.nodes
        start = next(self._turns) % len(healthy) if healthy else 0
        return [*healthy[start:], *healthy[:start]]

    @contextlib.asynccontextmanager
    async def request(
        self,
        method: str,
        path: str,
        *,
        kind: str,
        headers: CIMultiDict[str] | Mapping[str, str],
        body: bytes | aiohttp.StreamReader | None = None,
        read_timeout_s: float | None = -1.0,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The answer of the first node that takes `method path` (`path`: encoded, with its
        query), its body unread; timed as `kind` until the block ends. `read_timeout_s`: the
        longest silence waited out (-1: the transport's; None: no limit). A `body` stream is
        only sent if a node is connected, so failover may send it to the next. Raises
        UpstreamError when no node answers."""
        nodes = self.in_turn()
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=CONNECT_TIMEOUT_S,
            sock_read=self._read_timeout_s if read_timeout_s == -1.0 else read_timeout_s,
        )
        for attempt, node in enumerate(nodes, start=1):
            target = URL(str(node.url).rstrip("/") + path, encoded=True)
            sent = CIMultiDict(headers)
            if self._signer is not None:
                signed = body if not isinstance(body, aiohttp.StreamReader) else None
                sent.update(self._signer(method, str(target), signed, sent))
            # A file-like payload: aiohttp writes large bytes in one blocking call otherwise.
            payload = io.BytesIO(body) if isinstance(body, bytes) else body
            started = time.perf_counter()
            try:
                answer = await self.session.request(
                    method,
                    target,
                    headers=sent,
                    data=payload,
                    allow_redirects=False,
                    skip_auto_headers=_NEVER_ADDED,
                    timeout=timeout,
                )
            except aiohttp.ClientSSLError as error:
                self._count(node, kind, "error", started)
                log.warning("upstream TLS handshake with %s failed: %s", node.label, error)
                raise tls_refused() from error
            except _NOT_CONNECTED as error:
                self._count(node, kind, "error", started)
                self._eject(node, error)
                if attempt < len(nodes):
                    self._metrics.upstream_failover.labels(kind).inc()
                    continue
                raise unreachable() from error
            except (aiohttp.ClientConnectionError, TimeoutError) as error:
                # Sent, and no status line came back: never sent again.
                self._count(node, kind, "error", started)
                self._eject(node, error)
                raise no_answer(error) from error
            self._restore(node)
            try:
                yield answer
            finally:
                answer.release()
                self._count(node, kind, str(answer.status), started)
            return
        raise UpstreamError(
            502, error_body(502, "upstream_unreachable", "no OpenSearch node is configured")
        )

    async def json(
        self,
        method: str,
        path: str,
        *,
        kind: str,
        headers: Mapping[str, str],
        body: Any = None,
        ndjson: Sequence[Any] | None = None,
    ) -> Any:
        """The cluster's JSON answer to `body` (or to `ndjson`, one line per item), or its
        refusal raised as an UpstreamError carrying the cluster's own body and challenge."""
        sent: CIMultiDict[str] = CIMultiDict(headers)
        for name in ("Content-Length", "Content-Encoding", "Content-Type", "Accept-Encoding"):
            sent.popall(name, None)
        # The session does not inflate answers (pass-through bodies stay byte-for-byte).
        sent["Accept-Encoding"] = "identity"
        data: bytes | None = None
        if ndjson is not None:
            data = b"".join(jsonio.dumps(line) + b"\n" for line in ndjson)
            sent["Content-Type"] = "application/x-ndjson"
        elif body is not None:
            data = jsonio.dumps(body)
            sent["Content-Type"] = "application/json"
        async with self.request(method, path, kind=kind, headers=sent, body=data) as answer:
            try:
                payload = await answer.read()
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as e:
                raise no_answer(e) from e
        return _decoded(answer, payload)

    def _count(self, node: Node, kind: str, status: str, started: float) -> None:
        self._metrics.upstream_requests.labels(status, node.label).inc()
        self._metrics.upstream_duration.labels(kind).observe(time.perf_counter() - started)

    def _eject(self, node: Node, error: Exception) -> None:
        if node.ejected:
            return
        log.warning(
            "OpenSearch node %s ejected until it answers a probe: %s",
            node.label,
            type(error).__name__ + (f": {error}" if str(error) else ""),
        )
        self._metrics.upstream_ejections.labels(node.label).inc()
        self._metrics.upstream_node_ejected.labels(node.label).set(1)
        node.probe = asyncio.create_task(self._probe(node))

    def _restore(self, node: Node) -> None:
        """An answer from `node` proves it is back, whatever its probe is doing."""
        if node.probe is None:
            return
        if node.probe is not asyncio.current_task():
            node.probe.cancel()
        node.probe = None
        self._metrics.upstream_node_ejected.labels(node.label).set(0)
        log.info("OpenSearch node %s is back in the rotation", node.label)

    async def _probe(self, node: Node) -> None:
        """Wait, then `HEAD /` until any HTTP answer comes; each wait twice the last."""
        interval_s = self._probe_interval_s
        while True:
            await asyncio.sleep(interval_s)
            headers = dict(self._probe_headers)
            if self._signer is not None:
                headers.update(self._signer("HEAD", str(node.url), None, headers))
            try:
                async with self.session.head(
                    node.url,
                    headers=headers,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(
                        total=None,
                        sock_connect=min(CONNECT_TIMEOUT_S, self._read_timeout_s),
                        sock_read=self._read_timeout_s,
                    ),
                ):
                    self._restore(node)
                    return
            except (aiohttp.ClientError, TimeoutError):
                interval_s = min(interval_s * 2, LONGEST_PROBE_INTERVAL_S)


def _decoded(answer: aiohttp.ClientResponse, payload: bytes) -> Any:
    challenge = answer.headers.get("WWW-Authenticate")
    relayed = {"WWW-Authenticate": challenge} if challenge else {}
    try:
        decoded = json.loads(payload) if payload else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        decoded = None
    if answer.status >= 400:
        if isinstance(decoded, dict) and "error" in decoded:
            raise UpstreamError(answer.status, decoded, headers=relayed)
        text = payload.decode(errors="replace")
        raise UpstreamError(
            answer.status,
            error_body(answer.status, "upstream_error", text),
            headers=relayed,
            text=text,
        )
    if decoded is None and payload:
        raise UpstreamError(
            502, error_body(502, "upstream_error", "OpenSearch answered with no JSON")
        )
    return decoded
