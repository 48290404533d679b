"""The request path's one transport against fake nodes (pure transport behaviour): an answer the
cluster gave is relayed and never retried; a node that cannot be connected to is skipped and
ejected; a blackholed node costs one timeout, then is probed in the background until it answers."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from sidecar.metrics import Metrics
from sidecar.retrieval.opensearch import Upstream
from sidecar.retrieval.transport import Transport, UpstreamError

BUSY = {
    "error": {
        "root_cause": [{"type": "rejected_execution_exception", "reason": "busy"}],
        "type": "rejected_execution_exception",
        "reason": "busy",
    },
    "status": 503,
}
READ_TIMEOUT_S = 0.5
PROBE_INTERVAL_S = 0.05
# Only a bound on waiting for the background probe; it takes a few intervals when it works.
RESTORE_WITHIN_S = 10.0


def node(status: int, calls: list[int], name: int) -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        calls.append(name)
        body = {**BUSY, "status": status} if status != 200 else {"hits": {"hits": []}}
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_post("/{index}/_search", answer)
    app.router.add_route("HEAD", "/", answer)
    return app


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class Blackhole:
    """Accepts connections and reads what comes, never answers: a node that hangs, or a network
    that drops every answer. `heal()` makes it answer 200 from then on."""

    def __init__(self) -> None:
        self.healed = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                await self.healed.wait()
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.lower().split(b"\r\n")
                        if line.startswith(b"content-length:")
                    ),
                    0,
                )
                await reader.readexactly(length)
                body = b"" if head.startswith(b"HEAD ") else b'{"hits":{"hits":[]}}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def heal(self) -> None:
        self.healed.set()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            self.server.close()


def transport(urls: list[str], metrics: Metrics) -> Transport:
    return Transport(urls, READ_TIMEOUT_S, metrics, probe_interval_s=PROBE_INTERVAL_S)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value if value is not None else 0.0


async def until(condition: Callable[[], bool], within_s: float) -> bool:
    """Whether `condition` holds within `within_s`, looked at between the loop's other work."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(PROBE_INTERVAL_S)
    return True


async def searches(upstream: Upstream, count: int) -> list[tuple[int, float]]:
    """(status, seconds) of `count` searches one after another."""
    outcomes = []
    for _ in range(count):
        started = time.monotonic()
        try:
            await upstream.search("docs", {"query": {"match_all": {}}})
            status = 200
        except UpstreamError as error:
            status = error.status
        outcomes.append((status, time.monotonic() - started))
    return outcomes


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))  # type: ignore[arg-type]


@pytest.mark.parametrize("status", [502, 503, 504])
def test_an_answer_the_cluster_gave_is_relayed_whole_not_retried_on_another_node(
    status: int,
) -> None:
    """A 503 is the cluster's own word (a full queue, a shard not ready): sent again to the next
    node it doubles the load that caused it; and the node that said it stays in the rotation."""
    calls: list[int] = []
    metrics = Metrics(CollectorRegistry())

    async def scenario() -> None:
        async with (
            TestServer(node(status, calls, 1), host="127.0.0.1") as first,
            TestServer(node(200, calls, 2), host="127.0.0.1") as second,
        ):
            nodes = transport([str(first.make_url("")), str(second.make_url(""))], metrics)
            upstream = Upstream(nodes, metrics)
            refused = []
            try:
                for _ in range(4):  # the nodes are taken in turn
                    try:
                        await upstream.search("docs", {"query": {"match_all": {}}})
                    except UpstreamError as error:
                        refused.append((error.status, error.body))
            finally:
                await nodes.close()
        assert refused == [(status, {**BUSY, "status": status})] * 2, "the cluster's body, whole"

    run(scenario)
    assert len(calls) == 4, "each search reached one node once"
    assert calls.count(1) == 2, "the node that answered an error is not left out afterwards"


def test_a_node_that_refuses_connections_is_skipped_once_then_left_out_until_it_answers() -> None:
    calls: list[int] = []
    metrics = Metrics(CollectorRegistry())

    async def scenario() -> None:
        async with TestServer(node(200, calls, 2), host="127.0.0.1") as alive:
            down = f"http://127.0.0.1:{closed_port()}"
            nodes = transport([down, str(alive.make_url(""))], metrics)
            try:
                outcomes = await searches(Upstream(nodes, metrics), 6)
                assert nodes.nodes[0].ejected
            finally:
                await nodes.close()
        assert [status for status, _ in outcomes] == [200] * 6
        label = down.removeprefix("http://")
        assert sample(metrics, "sidecar_upstream_failover_total", kind="search") == 1.0
        assert sample(metrics, "sidecar_upstream_ejections_total", node=label) == 1.0
        assert sample(metrics, "sidecar_upstream_node_ejected", node=label) == 1.0

    run(scenario)
    assert calls == [2] * 6


def test_a_blackholed_node_costs_one_timeout_then_returns_when_it_answers_a_probe() -> None:
    """The node takes connections and never answers: the search that reached it gets a 504 (it
    may have run there, so it is not sent again), and no later search waits for it. Once it
    answers again the background probe puts it back, and searches reach it."""
    calls: list[int] = []
    metrics = Metrics(CollectorRegistry())
    hole = Blackhole()

    async def scenario() -> None:
        async with (
            hole.running() as blackholed,
            TestServer(node(200, calls, 2), host="127.0.0.1") as alive,
        ):
            nodes = transport([blackholed, str(alive.make_url(""))], metrics)
            upstream = Upstream(nodes, metrics)
            try:
                outcomes = await searches(upstream, 8)
                timed_out = [seconds for status, seconds in outcomes if status == 504]
                assert len(timed_out) <= 1, outcomes
                assert [status for status, _ in outcomes].count(200) >= 7
                assert all(s < READ_TIMEOUT_S for status, s in outcomes if status == 200)
                label = blackholed.removeprefix("http://")
                assert sample(metrics, "sidecar_upstream_ejections_total", node=label) == 1.0
                assert nodes.nodes[0].ejected
                hole.heal()
                assert await until(lambda: not nodes.nodes[0].ejected, RESTORE_WITHIN_S)
                assert sample(metrics, "sidecar_upstream_node_ejected", node=label) == 0.0
                before = len(calls)
                assert [status for status, _ in await searches(upstream, 4)] == [200] * 4
                assert len(calls) - before == 2, "the restored node takes its turns again"
            finally:
                await nodes.close()

    run(scenario)


def test_when_every_node_is_ejected_every_node_is_still_tried() -> None:
    """A one-node cluster that refused a connection is not written off: the next request goes
    to it again (and its answer puts it back), without waiting for the probe."""
    metrics = Metrics(CollectorRegistry())

    async def scenario() -> None:
        calls: list[int] = []
        app = node(200, calls, 1)
        async with TestServer(app, host="127.0.0.1") as server:
            url = str(server.make_url(""))
            port = server.port
        # The server is gone: its port refuses.
        nodes = Transport([url], READ_TIMEOUT_S, metrics, probe_interval_s=60.0)
        upstream = Upstream(nodes, metrics)
        try:
            assert [status for status, _ in await searches(upstream, 1)] == [502]
            assert nodes.nodes[0].ejected
            async with TestServer(app, host="127.0.0.1", port=port):
                assert [status for status, _ in await searches(upstream, 1)] == [200]
            assert not nodes.nodes[0].ejected
        finally:
            await nodes.close()

    run(scenario)


def test_integers_past_64_bits_go_and_come_back_exact() -> None:
    """OpenSearch's unsigned_long holds up to 2^64 - 1: a document's value comes back as the
    cluster gave it, and a query holding such a number is sent, not refused."""
    largest = 2**64 - 1
    received: list[bytes] = []

    async def echo(request: web.Request) -> web.Response:
        received.append(await request.read())
        text = (
            '{"hits": {"hits": [{"_index": "d", "_id": "1", "_score": 1.0, "_source": {"n": %d}}]}}'
        )
        return web.Response(text=text % largest, content_type="application/json")

    async def scenario() -> None:
        app = web.Application()
        app.router.add_post("/{index}/_search", echo)
        metrics = Metrics(CollectorRegistry())
        async with TestServer(app, host="127.0.0.1") as server:
            nodes = transport([str(server.make_url(""))], metrics)
            try:
                answer = await Upstream(nodes, metrics).search(
                    "d", {"query": {"term": {"n": -(2**63) - 1}}}
                )
            finally:
                await nodes.close()
        assert answer["hits"]["hits"][0]["_source"]["n"] == largest
        assert received == [b'{"query":{"term":{"n":-9223372036854775809}}}']

    run(scenario)
