"""The first stage's client against two fake nodes (pure transport behaviour): an answer the
cluster gave is relayed, never retried on another node."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from sidecar.metrics import Metrics
from sidecar.retrieval.opensearch import Upstream, UpstreamError

BUSY = {"error": {"type": "rejected_execution_exception", "reason": "busy"}, "status": 503}


def node(status: int, calls: list[int], name: int) -> web.Application:
    async def search(request: web.Request) -> web.Response:
        calls.append(name)
        body = {**BUSY, "status": status} if status != 200 else {"hits": {"hits": []}}
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_post("/{index}/_search", search)
    return app


@pytest.mark.parametrize("status", [502, 503, 504])
def test_an_answer_the_cluster_gave_is_relayed_not_retried_on_another_node(status: int) -> None:
    """A 503 is the cluster's own word (a full queue, a shard not ready): sent again to the next
    node it doubles the load that caused it, and opensearch-py marked the node dead for it."""
    calls: list[int] = []

    async def scenario() -> None:
        async with (
            TestServer(node(status, calls, 1), host="127.0.0.1") as first,
            TestServer(node(200, calls, 2), host="127.0.0.1") as second,
        ):
            urls = [str(first.make_url("")), str(second.make_url(""))]
            upstream = Upstream(urls, 5.0, Metrics(CollectorRegistry()))
            try:
                answered: list[tuple[int, object]] = []
                for _ in range(4):  # the nodes are taken in turn
                    try:
                        await upstream.search("docs", {"query": {"match_all": {}}})
                        answered.append((200, None))
                    except UpstreamError as error:
                        answered.append((error.status, error.body))
            finally:
                await upstream.close()
        refused = [(code, json.dumps(body)) for code, body in answered if code != 200]
        assert [code for code, _ in refused] == [status, status]
        assert all("rejected_execution_exception" in text for _, text in refused)

    asyncio.run(scenario())
    assert len(calls) == 4, "each search reached one node once"
    assert calls.count(1) == 2, "the node that answered an error is not left out afterwards"
