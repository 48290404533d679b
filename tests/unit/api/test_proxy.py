import asyncio
import gzip
import json
import random
import socket
import struct
import zlib
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import aiohttp
import pytest
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.test_utils import TestServer, make_mocked_request
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry
from yarl import URL

from sidecar.api.errors import ApiError, error_response
from sidecar.api.proxy import ForwardPolicy, forward, read_body, read_timeout_s
from sidecar.logging import request_id_var
from sidecar.metrics import Metrics
from sidecar.retrieval.identity import UpstreamIdentity
from sidecar.retrieval.transport import Transport

METRICS = Metrics(CollectorRegistry())
FORWARD = UpstreamIdentity.build("forward", ["authorization"])

# Only a guard against hangs; nothing here waits that long when the proxy behaves.
HANG_GUARD_S = 5.0
MAX_BODY_BYTES = 2 * 1024 * 1024
# The client's own defaults, skipped so that anything of the kind reaching upstream came from the proxy.
CLIENT_AUTO_HEADERS = frozenset({"Accept-Encoding", "User-Agent", "Content-Type"})
SIZE_LIMIT_REASON = "request body is larger than"


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def guarded() -> None:
        await asyncio.wait_for(test(), HANG_GUARD_S)

    asyncio.run(guarded())


@dataclass
class Received:
    method: str
    raw_path: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class Answer:
    status: int = 200
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    body: bytes = b'{"acknowledged":true}'


class FakeUpstream:
    """Stands in for OpenSearch: records each request as it arrived and answers with `answer`."""

    def __init__(self, answer: Answer | None = None) -> None:
        self.answer = answer or Answer()
        self.received: list[Received] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(
            Received(
                request.method, request.raw_path, CIMultiDict(request.headers), await request.read()
            )
        )
        return web.Response(
            status=self.answer.status, headers=self.answer.headers, body=self.answer.body
        )

    def app(self) -> web.Application:
        app = web.Application(client_max_size=2 * MAX_BODY_BYTES)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    def only(self) -> Received:
        assert len(self.received) == 1
        return self.received[0]


def front_app(
    transport: Transport,
    policy: ForwardPolicy,
    request_id: str | None = None,
    settle_body: bool = False,
    identity: UpstreamIdentity = FORWARD,
) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        if settle_body:
            # The whole body is buffered before forward() runs, however it arrived.
            await request.content.wait_eof()
        if request_id is not None:
            request_id_var.set(request_id)
        try:
            return await forward(request, transport, identity, policy)
        except Exception as error:  # as the app's edge middleware does
            return error_response(error)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@dataclass
class Proxy:
    client: aiohttp.ClientSession
    base: str
    upstream_host: str

    def url(self, raw_path: str) -> URL:
        return URL(self.base + raw_path, encoded=True)


@asynccontextmanager
async def proxied(
    upstream: FakeUpstream,
    max_body_bytes: int = MAX_BODY_BYTES,
    upstream_url: URL | None = None,
    request_id: str | None = None,
    settle_body: bool = False,
    identity: UpstreamIdentity = FORWARD,
    trust_forwarded: bool = False,
) -> AsyncIterator[Proxy]:
    async with TestServer(upstream.app(), host="127.0.0.1") as upstream_server:
        target = upstream_url or upstream_server.make_url("/")
        transport = Transport([str(target)], HANG_GUARD_S, METRICS)
        policy = ForwardPolicy(max_body_bytes, HANG_GUARD_S, HANG_GUARD_S, trust_forwarded)
        try:
            app = front_app(transport, policy, request_id, settle_body, identity)
            async with (
                TestServer(app, host="127.0.0.1") as front,
                aiohttp.ClientSession(auto_decompress=False) as client,
            ):
                base = str(front.make_url("")).rstrip("/")
                yield Proxy(client, base, f"{upstream_server.host}:{upstream_server.port}")
        finally:
            await transport.close()


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def assert_opensearch_error(body: dict[str, Any], status: int, error_type: str) -> None:
    assert set(body) == {"error", "status"}
    assert body["status"] == status
    error = body["error"]
    assert error["type"] == error_type
    assert isinstance(error["reason"], str)
    assert error["reason"]
    assert error["root_cause"] == [{"type": error_type, "reason": error["reason"]}]


# 1. method, path and query string


@pytest.mark.parametrize(
    ("method", "raw_path"),
    [
        ("PUT", "/idx/_doc/a%2Fb?refresh=true&routing=x"),
        ("GET", "/_cat/indices?v&h=index,health&format=json"),
        ("POST", "/logs-2024.01.*/_search?q=title:%22two%20words%22&size=5"),
        ("GET", "/caf%C3%A9/_doc/%E2%9C%93?routing=%2B1%20x"),
        ("PATCH", "/_plugins/_custom/x%3Fy"),
        ("OPTIONS", "/"),
    ],
)
def test_method_path_and_query_arrive_unchanged(method: str, raw_path: str) -> None:
    async def scenario() -> None:
        upstream = FakeUpstream()
        async with (
            proxied(upstream) as proxy,
            proxy.client.request(method, proxy.url(raw_path)) as response,
        ):
            assert response.status == 200
        received = upstream.only()
        assert received.method == method
        assert received.raw_path == raw_path

    run(scenario)


def test_upstream_url_with_trailing_slash_does_not_double_the_slash() -> None:
    async def scenario() -> None:
        upstream = FakeUpstream()
        async with proxied(upstream) as proxy, proxy.client.get(proxy.url("/idx/_count")):
            pass
        assert upstream.only().raw_path == "/idx/_count"

    run(scenario)


# 2. request headers


def test_end_to_end_request_headers_arrive_unchanged() -> None:
    async def scenario() -> None:
        upstream = FakeUpstream()
        headers = CIMultiDict(
            [
                ("Authorization", "Basic YWRtaW46YWRtaW4="),
                ("X-Opaque-Id", "trace-42"),
                ("Accept", "application/json"),
                ("X-Custom", "first"),
                ("X-Custom", "second"),
            ]
        )
        async with (
            proxied(upstream) as proxy,
            proxy.client.get(
                proxy.url("/_cluster/health"),
                headers=headers,
                skip_auto_headers=CLIENT_AUTO_HEADERS,
            ),
        ):
            pass
        received = upstream.only().headers
        assert received["Authorization"] == "Basic YWRtaW46YWRtaW4="
        assert received["X-Opaque-Id"] == "trace-42"
        assert received["Accept"] == "application/json"
        assert received.getall("X-Custom") == ["first", "second"]

    run(scenario)


def test_hop_by_hop_request_headers_are_not_forwarded() -> None:
    async def scenario() -> None:
        upstream = FakeUpstream()
        headers = {
            "Connection": "keep-alive",
            "Keep-Alive": "timeout=5, max=1000",
            "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
            "Proxy-Connection": "keep-alive",
            "TE": "trailers",
            "Authorization": "Bearer end-to-end",
        }
        async with (
            proxied(upstream) as proxy,
            proxy.client.get(
                proxy.url("/"), headers=headers, skip_auto_headers=CLIENT_AUTO_HEADERS
            ),
        ):
            pass
        received = upstream.only().headers
        for name in ("Keep-Alive", "Proxy-Authorization", "Proxy-Connection", "TE"):
            assert name not in received
        assert "keep-alive" not in received.get("Connection", "")
        assert received["Authorization"] == "Bearer end-to-end"
        assert received["Host"] == proxy.upstream_host

    run(scenario)


def test_headers_named_in_connection_are_not_forwarded() -> None:
    async def scenario() -> None:
        upstream = FakeUpstream()
        headers = {"Connection": "keep-alive, X-Hop-Secret", "X-Hop-Secret": "for the proxy only"}
        async with (
            proxied(upstream) as proxy,
            proxy.client.get(
                proxy.url("/"), headers=headers, skip_auto_headers=CLIENT_AUTO_HEADERS
            ),
        ):
            pass
        assert "X-Hop-Secret" not in upstream.only().headers

    run(scenario)


@pytest.mark.parametrize(
    ("method", "body"), [("GET", None), ("POST", b'{"query":{"match_all":{}}}')]
)
def test_proxy_adds_no_accept_encoding_user_agent_or_content_type(
    method: str, body: bytes | None
) -> None:
    async def scenario() -> None:
        upstream = FakeUpstream()
        async with (
            proxied(upstream) as proxy,
            proxy.client.request(
                method, proxy.url("/idx/_search"), data=body, skip_auto_headers=CLIENT_AUTO_HEADERS
            ),
        ):
            pass
        received = upstream.only()
        for name in CLIENT_AUTO_HEADERS:
            assert name not in received.headers
        assert received.body == (body or b"")

    run(scenario)


def test_client_sent_accept_encoding_user_agent_and_content_type_are_kept() -> None:
    async def scenario() -> None:
        upstream = FakeUpstream()
        headers = {
            "Accept-Encoding": "identity",
            "User-Agent": "opensearch-py/2.6.0",
            "Content-Type": "application/x-ndjson",
        }
        async with (
            proxied(upstream) as proxy,
            proxy.client.post(
                proxy.url("/_bulk"),
                data=b'{"index":{"_index":"i"}}\n{"a":1}\n',
                headers=headers,
                skip_auto_headers=CLIENT_AUTO_HEADERS,
            ),
        ):
            pass
        received = upstream.only().headers
        for name, value in headers.items():
            assert received.getall(name) == [value]

    run(scenario)


# 3. request bodies


def test_binary_request_body_arrives_byte_for_byte() -> None:
    async def scenario() -> None:
        upstream = FakeUpstream()
        body = bytes(range(256)) * 4 + b"\xff\xfe\x80\xc3\x28\x00"
        async with (
            proxied(upstream) as proxy,
            proxy.client.put(
                proxy.url("/idx/_doc/1"),
                data=body,
                headers={"Content-Type": "application/octet-stream"},
            ),
        ):
            pass
        received = upstream.only()
        assert received.body == body
        assert received.headers["Content-Length"] == str(len(body))

    run(scenario)


def test_one_mebibyte_request_body_arrives_byte_for_byte() -> None:
    async def scenario() -> None:
        upstream = FakeUpstream()
        body = random.Random(7).randbytes(1024 * 1024)
        async with (
            proxied(upstream) as proxy,
            proxy.client.post(proxy.url("/_bulk"), data=body) as response,
        ):
            assert response.status == 200
        assert upstream.only().body == body

    run(scenario)


def test_chunked_request_body_is_streamed_through_chunked() -> None:
    """A body of unknown length goes on as it comes, chunked, without being read first."""

    async def scenario() -> None:
        upstream = FakeUpstream()

        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"query":'
            yield b'{"match_all":{}}}'

        async with (
            proxied(upstream) as proxy,
            proxy.client.post(proxy.url("/idx/_search"), data=chunks()) as response,
        ):
            assert response.status == 200
        received = upstream.only()
        assert received.body == b'{"query":{"match_all":{}}}'
        assert received.headers["Transfer-Encoding"] == "chunked"
        assert "Content-Length" not in received.headers

    run(scenario)


# 4. responses


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (201, b'{"_index":"idx","_id":"1","result":"created"}'),
        (404, b'{"error":{"type":"index_not_found_exception"},"status":404}'),
        (429, b'{"error":{"type":"rejected_execution_exception"},"status":429}'),
        (500, b"\x00\x01 not json \xff"),
    ],
)
def test_response_status_headers_and_body_come_back_unchanged(status: int, body: bytes) -> None:
    async def scenario() -> None:
        headers = CIMultiDict(
            [
                ("Content-Type", "application/vnd.opensearch+json; charset=UTF-8"),
                ("X-Opaque-Id", "trace-42"),
                ("Warning", '299 OpenSearch "first deprecation"'),
                ("Warning", '299 OpenSearch "second deprecation"'),
                ("Retry-After", "7"),
            ]
        )
        upstream = FakeUpstream(Answer(status=status, headers=headers, body=body))
        async with (
            proxied(upstream) as proxy,
            proxy.client.post(proxy.url("/idx/_doc/1"), data=b"{}") as response,
        ):
            assert response.status == status
            assert response.headers["Content-Type"] == headers["Content-Type"]
            assert response.headers["X-Opaque-Id"] == "trace-42"
            assert response.headers.getall("Warning") == headers.getall("Warning")
            assert response.headers["Retry-After"] == "7"
            assert response.headers["Content-Length"] == str(len(body))
            assert await response.read() == body

    run(scenario)


def test_hop_by_hop_response_headers_are_not_passed_back() -> None:
    async def scenario() -> None:
        headers = CIMultiDict(
            [
                ("Keep-Alive", "timeout=5, max=100"),
                ("Proxy-Authenticate", 'Basic realm="upstream"'),
                ("X-Kept", "yes"),
            ]
        )
        upstream = FakeUpstream(Answer(headers=headers))
        async with (
            proxied(upstream) as proxy,
            proxy.client.get(proxy.url("/")) as response,
        ):
            assert response.status == 200
            assert "Keep-Alive" not in response.headers
            assert "Proxy-Authenticate" not in response.headers
            assert response.headers["X-Kept"] == "yes"
            assert await response.read() == Answer().body

    run(scenario)


def test_gzip_response_reaches_the_client_still_compressed() -> None:
    async def scenario() -> None:
        document = json.dumps({"hits": {"hits": [{"_id": str(i)} for i in range(200)]}}).encode()
        compressed = gzip.compress(document)
        headers = CIMultiDict(
            [("Content-Type", "application/json; charset=UTF-8"), ("Content-Encoding", "gzip")]
        )
        upstream = FakeUpstream(Answer(headers=headers, body=compressed))
        async with (
            proxied(upstream) as proxy,
            proxy.client.get(
                proxy.url("/idx/_search"),
                headers={"Accept-Encoding": "gzip"},
                skip_auto_headers=CLIENT_AUTO_HEADERS,
            ) as response,
        ):
            assert response.status == 200
            assert response.headers["Content-Encoding"] == "gzip"
            assert response.headers["Content-Type"] == "application/json; charset=UTF-8"
            raw = await response.read()
        assert raw == compressed
        assert gzip.decompress(raw) == document
        assert upstream.only().headers["Accept-Encoding"] == "gzip"

    run(scenario)


def test_large_response_body_comes_back_byte_for_byte() -> None:
    async def scenario() -> None:
        body = random.Random(11).randbytes(1024 * 1024 + 17)
        upstream = FakeUpstream(Answer(body=body))
        async with (
            proxied(upstream) as proxy,
            proxy.client.get(proxy.url("/idx/_search")) as response,
        ):
            assert await response.read() == body

    run(scenario)


def test_request_id_is_added_to_the_response_when_set() -> None:
    async def scenario() -> None:
        upstream = FakeUpstream()
        async with (
            proxied(upstream, request_id="req-123") as proxy,
            proxy.client.get(proxy.url("/")) as response,
        ):
            assert response.headers["X-Request-Id"] == "req-123"

    run(scenario)


def test_no_request_id_header_when_none_is_set() -> None:
    async def scenario() -> None:
        upstream = FakeUpstream()
        async with (
            proxied(upstream) as proxy,
            proxy.client.get(proxy.url("/")) as response,
        ):
            assert "X-Request-Id" not in response.headers

    run(scenario)


def test_redirects_are_passed_back_not_followed() -> None:
    async def scenario() -> None:
        headers = CIMultiDict([("Location", "/elsewhere")])
        upstream = FakeUpstream(Answer(status=302, headers=headers, body=b""))
        async with (
            proxied(upstream) as proxy,
            proxy.client.get(proxy.url("/old"), allow_redirects=False) as response,
        ):
            assert response.status == 302
            assert response.headers["Location"] == "/elsewhere"
        assert [r.raw_path for r in upstream.received] == ["/old"]

    run(scenario)


# 5. body size: the cluster's limit, not the sidecar's


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_streamed_body_above_the_sidecars_read_limit_reaches_the_cluster(chunked: bool) -> None:
    """The limit is for bodies the sidecar reads; the cluster's own (and its 413) apply to the
    rest, as they would without the sidecar."""

    async def scenario() -> None:
        upstream = FakeUpstream()
        limit = 1024
        body = random.Random(3).randbytes(64 * limit)

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(body), 4096):
                yield body[start : start + 4096]

        async with (
            proxied(upstream, max_body_bytes=limit) as proxy,
            proxy.client.post(
                proxy.url("/_msearch"), data=chunks() if chunked else body
            ) as response,
        ):
            assert response.status == 200
        assert upstream.only().body == body

    run(scenario)


def test_the_clusters_413_comes_back_as_it_gave_it() -> None:
    async def scenario() -> None:
        refusal = b'{"error":{"type":"content_too_long_exception"},"status":413}'
        upstream = FakeUpstream(Answer(status=413, body=refusal))
        async with (
            proxied(upstream) as proxy,
            proxy.client.post(proxy.url("/_msearch"), data=b"{}\n{}\n") as response,
        ):
            assert response.status == 413
            assert await response.read() == refusal

    run(scenario)


def test_a_compressed_body_above_the_read_limit_gets_413_and_never_reaches_upstream() -> None:
    """A compressed body is read (inflated) before it goes on: that read is bounded."""

    async def scenario() -> None:
        upstream = FakeUpstream()
        async with (
            proxied(upstream, max_body_bytes=1024) as proxy,
            proxy.client.post(
                proxy.url("/_msearch"),
                data=gzip.compress(b"x" * 4096),
                headers={"Content-Encoding": "gzip"},
            ) as response,
        ):
            assert response.status == 413
            answer = await response.json()
        assert_opensearch_error(answer, 413, "content_too_long_exception")
        assert SIZE_LIMIT_REASON in answer["error"]["reason"]
        assert upstream.received == []

    run(scenario)


# 5b. how long the cluster may take


@pytest.mark.parametrize(
    ("query", "expected_s"),
    [
        ({}, 300.0),
        ({"timeout": "35s"}, 300.0),  # shorter than the idle limit: the idle limit
        ({"timeout": "10m"}, 610.0),
        ({"wait_for_nodes": "5", "master_timeout": "2h"}, 7210.0),
        ({"cluster_manager_timeout": "400000ms", "timeout": "1s"}, 410.0),
        ({"timeout": "7d"}, 604810.0),
        ({"timeout": "-1"}, None),  # wait without limit, as asked
        ({"timeout": "soon"}, 300.0),  # the cluster refuses it itself
        ({"timeout": "12"}, 300.0),
    ],
)
def test_a_request_that_asks_the_cluster_to_wait_is_never_cut_shorter(
    query: dict[str, str], expected_s: float | None
) -> None:
    assert read_timeout_s(query, 300.0) == expected_s


def test_a_slow_answer_within_the_wait_the_request_asked_for_is_relayed() -> None:
    """The idle limit is 0.2 s here; the cluster answers after 0.5 s a request that asked for up
    to 1 s (`timeout=1s`), and its answer comes back instead of a 504."""

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.5)
        return web.json_response({"timed_out": True}, status=408)

    async def scenario() -> None:
        app = web.Application()
        app.router.add_get("/_cluster/health", slow)
        async with TestServer(app, host="127.0.0.1") as cluster:
            transport = Transport([str(cluster.make_url("/"))], HANG_GUARD_S, METRICS)
            policy = ForwardPolicy(MAX_BODY_BYTES, HANG_GUARD_S, idle_timeout_s=0.2)
            front = front_app(transport, policy)
            try:
                async with (
                    TestServer(front, host="127.0.0.1") as server,
                    aiohttp.ClientSession() as client,
                ):
                    url = server.make_url("/_cluster/health")
                    async with client.get(url, params={"timeout": "1s"}) as answer:
                        assert answer.status == 408
                    async with client.get(url) as answer:
                        assert answer.status == 504, "no wait asked: the idle limit applies"
            finally:
                await transport.close()

    run(scenario)


# 5c. who the caller is, for the cluster's logs


@pytest.mark.parametrize("trust", [False, True], ids=["untrusted", "trusted"])
def test_the_callers_address_is_appended_and_a_claimed_chain_kept_only_when_trusted(
    trust: bool,
) -> None:
    async def scenario() -> None:
        upstream = FakeUpstream()
        claimed = {"X-Forwarded-For": "203.0.113.9", "Forwarded": "for=203.0.113.9;proto=https"}
        async with (
            proxied(upstream, trust_forwarded=trust) as proxy,
            proxy.client.get(proxy.url("/_cat/indices"), headers=claimed) as response,
        ):
            assert response.status == 200
        received = upstream.only().headers
        if trust:
            assert received.getall("X-Forwarded-For") == ["203.0.113.9, 127.0.0.1"]
            assert received.getall("Forwarded") == [
                "for=203.0.113.9;proto=https, for=127.0.0.1;proto=http"
            ]
        else:
            assert received.getall("X-Forwarded-For") == ["127.0.0.1"]
            assert received.getall("Forwarded") == ["for=127.0.0.1;proto=http"]

    run(scenario)


# 6. unreachable upstream


def test_unreachable_upstream_gets_502_in_opensearch_error_shape() -> None:
    async def scenario() -> None:
        upstream = FakeUpstream()
        dead = URL(f"http://127.0.0.1:{closed_port()}")
        async with (
            proxied(upstream, upstream_url=dead) as proxy,
            proxy.client.post(proxy.url("/idx/_search"), data=b"{}") as response,
        ):
            assert response.status == 502
            answer = await response.json()
        assert_opensearch_error(answer, 502, "upstream_unreachable")
        assert "127.0.0.1" not in answer["error"]["reason"]

    run(scenario)


# 7. HEAD and DELETE


@pytest.mark.parametrize("status", [200, 404])
def test_head_passes_through_with_headers_and_no_body(status: int) -> None:
    async def scenario() -> None:
        headers = CIMultiDict([("Content-Type", "application/json; charset=UTF-8")])
        upstream = FakeUpstream(Answer(status=status, headers=headers, body=b'{"exists":1}'))
        async with (
            proxied(upstream) as proxy,
            proxy.client.head(proxy.url("/idx?local=true")) as response,
        ):
            assert response.status == status
            assert response.headers["Content-Type"] == "application/json; charset=UTF-8"
            assert response.headers["Content-Length"] == str(len(b'{"exists":1}'))
            assert await response.read() == b""
        received = upstream.only()
        assert (received.method, received.raw_path, received.body) == (
            "HEAD",
            "/idx?local=true",
            b"",
        )

    run(scenario)


def test_delete_without_body_passes_through() -> None:
    async def scenario() -> None:
        body = b'{"acknowledged":true}'
        upstream = FakeUpstream(Answer(body=body))
        async with (
            proxied(upstream) as proxy,
            proxy.client.delete(
                proxy.url("/idx-2024.01?ignore_unavailable=true"),
                skip_auto_headers=CLIENT_AUTO_HEADERS,
            ) as response,
        ):
            assert response.status == 200
            assert await response.read() == body
        received = upstream.only()
        assert received.method == "DELETE"
        assert received.raw_path == "/idx-2024.01?ignore_unavailable=true"
        assert received.body == b""
        assert "Content-Type" not in received.headers
        assert "Transfer-Encoding" not in received.headers

    run(scenario)


# read_body, driven with a real StreamReader fed by hand


def body_request(
    loop: asyncio.AbstractEventLoop, content_length: int | None
) -> tuple[web.Request, StreamReader]:
    reader = StreamReader(mock.Mock(), limit=2**16, loop=loop)
    headers = CIMultiDictProxy(
        CIMultiDict({} if content_length is None else {"Content-Length": str(content_length)})
    )
    request = make_mocked_request("POST", "/idx/_search", headers, payload=reader, loop=loop)
    return request, reader


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_read_body_returns_a_body_that_has_fully_arrived(declared: bool) -> None:
    async def scenario() -> None:
        body = b'{"query": "caf\xc3\xa9"}'
        request, reader = body_request(asyncio.get_running_loop(), len(body) if declared else None)
        reader.feed_data(body)
        reader.feed_eof()
        assert await read_body(request, max_body_bytes=1024, idle_timeout_s=HANG_GUARD_S) == body

    run(scenario)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_read_body_waits_for_a_body_that_arrives_in_pieces(declared: bool) -> None:
    async def scenario() -> None:
        first, rest = b'{"query": ', b'"what is bm25"}'
        total = len(first) + len(rest)
        loop = asyncio.get_running_loop()
        request, reader = body_request(loop, total if declared else None)
        reader.feed_data(first)

        def arrive_rest() -> None:
            reader.feed_data(rest)
            reader.feed_eof()

        reading = asyncio.ensure_future(
            read_body(request, max_body_bytes=1024, idle_timeout_s=HANG_GUARD_S)
        )
        # Scheduled after the read's first step: the rest arrives once read_body is waiting.
        loop.call_soon(arrive_rest)
        assert await reading == first + rest

    run(scenario)


def test_read_body_refuses_a_declared_length_above_the_limit_without_reading() -> None:
    async def scenario() -> None:
        request, reader = body_request(asyncio.get_running_loop(), content_length=2048)
        reader.feed_data(b"z" * 10)
        with pytest.raises(ApiError) as caught:
            await read_body(request, max_body_bytes=1024, idle_timeout_s=HANG_GUARD_S)
        assert (caught.value.status, caught.value.error_type) == (413, "content_too_long_exception")
        assert reader.total_bytes == 10
        assert await reader.read(10) == b"z" * 10

    run(scenario)


def test_read_body_refuses_an_undeclared_body_above_the_limit() -> None:
    async def scenario() -> None:
        request, reader = body_request(asyncio.get_running_loop(), content_length=None)
        reader.feed_data(b"z" * 1025)
        reader.feed_eof()
        with pytest.raises(ApiError) as caught:
            await read_body(request, max_body_bytes=1024, idle_timeout_s=HANG_GUARD_S)
        assert caught.value.status == 413
        assert SIZE_LIMIT_REASON in caught.value.reason

    run(scenario)


# Identity headers


def test_impersonation_headers_never_pass_unless_allowlisted() -> None:
    async def scenario() -> None:
        headers = {
            "Authorization": "Basic dXNlcjpwdw==",
            "opendistro_security_impersonate_as": "admin",
            "X-Proxy-User": "admin",
            "x-proxy-roles": "all_access",
            "securitytenant": "global",
        }
        upstream = FakeUpstream()
        async with (
            proxied(upstream) as proxy,
            proxy.client.get(proxy.url("/_search"), headers=headers) as answer,
        ):
            assert answer.status == 200
        received = upstream.only().headers
        assert received["Authorization"] == "Basic dXNlcjpwdw=="
        assert received["securitytenant"] == "global", "other headers pass as before"
        for name in ("opendistro_security_impersonate_as", "X-Proxy-User", "x-proxy-roles"):
            assert name not in received
        trusted = UpstreamIdentity.build("forward", ["authorization", "x-proxy-user"])
        upstream = FakeUpstream()
        async with (
            proxied(upstream, identity=trusted) as proxy,
            proxy.client.get(proxy.url("/_search"), headers=headers) as answer,
        ):
            assert answer.status == 200
        received = upstream.only().headers
        assert received["X-Proxy-User"] == "admin", "allowlisted by the operator"
        assert "x-proxy-roles" not in received

    run(scenario)


def test_service_mode_replaces_the_callers_identity() -> None:
    async def scenario() -> None:
        service = UpstreamIdentity.build("service", ["authorization"], "sidecar", "s3cret")
        upstream = FakeUpstream()
        async with (
            proxied(upstream, identity=service) as proxy,
            proxy.client.get(
                proxy.url("/_cat/indices"), headers={"Authorization": "Basic Y2FsbGVyOnB3"}
            ) as answer,
        ):
            assert answer.status == 200
        received = upstream.only().headers
        assert received.getall("Authorization") == ["Basic c2lkZWNhcjpzM2NyZXQ="]

    run(scenario)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_compressed_request_body_is_forwarded_inflated_at_once(encoding: str) -> None:
    """opensearch-py's http_compress=True sends gzip bodies; aiohttp inflates what it reads, so
    the body goes on inflated and without its Content-Encoding (it used to be streamed inflated
    under the compressed length, and the upstream waited for bytes that never came)."""
    document = json.dumps({"query": {"match": {"text": "compressed " * 200}}}).encode()
    compressed = gzip.compress(document) if encoding == "gzip" else zlib.compress(document)

    async def scenario() -> None:
        upstream = FakeUpstream()
        async with (
            proxied(upstream) as proxy,
            proxy.client.post(
                proxy.url("/idx/_search"),
                data=compressed,
                headers={"Content-Encoding": encoding, "Content-Type": "application/json"},
            ) as response,
        ):
            assert response.status == 200
        received = upstream.only()
        assert received.body == document
        assert "Content-Encoding" not in received.headers
        assert received.headers["Content-Length"] == str(len(document))

    run(scenario)


def test_a_body_that_does_not_inflate_is_a_400() -> None:
    async def scenario() -> None:
        upstream = FakeUpstream()
        async with (
            proxied(upstream) as proxy,
            proxy.client.post(
                proxy.url("/idx/_search"),
                data=b"this is not gzip at all",
                headers={"Content-Encoding": "gzip"},
            ) as response,
        ):
            assert response.status == 400
            answer = await response.json()
            assert answer["error"]["type"] == "parsing_exception"
            assert "not valid gzip" in answer["error"]["reason"]
        assert upstream.received == []

    run(scenario)


@pytest.mark.parametrize("reset", [False, True])
@pytest.mark.parametrize("announced", [1_000, 1_000_000])
def test_an_upstream_that_breaks_mid_body_cuts_the_client_off_at_once(
    reset: bool, announced: int
) -> None:
    """The cluster announces a body, sends 10 bytes and closes (or resets) the connection: small
    or large, an answer still arriving streams, so the client's transfer ends there, truncated,
    and does not hang until some idle timeout."""

    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % announced
        )
        writer.write(b'{"hits": [')
        await writer.drain()
        if reset:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_server(broken, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with (
                proxied(FakeUpstream(), upstream_url=URL(f"http://127.0.0.1:{port}/")) as proxy,
                proxy.client.get(proxy.url("/idx/_search")) as response,
            ):
                assert response.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()
        finally:
            server.close()
            await server.wait_closed()

    run(scenario)


def test_a_small_answer_still_arriving_reaches_the_client_as_it_comes() -> None:
    """The cluster sends half of a 1,000-byte answer and the rest only once the client has the
    first half: a proxy that waited for the whole of a small answer would never deliver."""
    first_half_seen = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"a" * 500)
        await writer.drain()
        await first_half_seen.wait()
        writer.write(b"b" * 500)
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_server(slow, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with (
                proxied(FakeUpstream(), upstream_url=URL(f"http://127.0.0.1:{port}/")) as proxy,
                proxy.client.get(proxy.url("/_cat/indices")) as response,
            ):
                assert await response.content.readexactly(500) == b"a" * 500
                first_half_seen.set()
                assert await response.read() == b"b" * 500
        finally:
            server.close()
            await server.wait_closed()

    run(scenario)


def test_a_body_that_stops_arriving_is_a_408_not_a_held_connection() -> None:
    """The client announced 1,000 bytes and sent 10: after the idle timeout the request is
    refused, and the connection is to be closed."""

    async def scenario() -> None:
        request, reader = body_request(asyncio.get_running_loop(), content_length=1000)
        reader.feed_data(b"z" * 10)
        with pytest.raises(ApiError) as caught:
            await read_body(request, max_body_bytes=2048, idle_timeout_s=0.05)
        assert (caught.value.status, caught.value.error_type) == (408, "request_timeout_exception")
        assert "SIDECAR_CLIENT_BODY_TIMEOUT_S" in caught.value.reason
        assert caught.value.headers == {"Connection": "close"}

    run(scenario)
