"""Which `_search` bodies the interception takes: one that cannot hold `ext.rerank` is forwarded as
it came without being parsed; one that names it however JSON allows is intercepted. Forwarding is
replaced by a recorder, and the only interception reached is the one that forwards (a scroll)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import cast

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from sidecar.api import intercept
from sidecar.config import Settings
from sidecar.metrics import Metrics
from sidecar.services import SERVICES, Services

JSON = {"Content-Type": "application/json"}


@dataclass
class Forwarded:
    body: bytes | None
    added_headers: dict[str, str]


def post(
    monkeypatch: pytest.MonkeyPatch, raw: bytes, query: str = ""
) -> tuple[list[Forwarded], Metrics]:
    """`raw` sent to the interception; what it forwarded, and its metrics."""
    forwarded: list[Forwarded] = []

    async def record(
        request: web.Request, body: bytes | None = None, added: dict[str, str] | None = None
    ) -> web.StreamResponse:
        forwarded.append(Forwarded(body, dict(added or {})))
        return web.json_response({})

    monkeypatch.setattr(intercept, "forward_upstream", record)
    metrics = Metrics(CollectorRegistry())
    app = web.Application()
    app[SERVICES] = cast(
        Services, SimpleNamespace(settings=Settings(), pipeline=SimpleNamespace(metrics=metrics))
    )
    app.router.add_post("/{index}/_search", intercept.intercept_search)

    async def send() -> None:
        async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as client:
            url = server.make_url(f"/idx/_search{query}")
            async with client.post(url, data=raw, headers=JSON) as answer:
                assert answer.status == 200, await answer.text()

    asyncio.run(send())
    return forwarded, metrics


def test_a_body_that_cannot_name_rerank_is_forwarded_as_it_came_unparsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A duplicate key would be refused (400) by the parse; unparsed, it is the cluster's to judge.
    raw = b'{"query": {"match": {"title": "caf\xc3\xa9"}}, "size": 3, "size": 4}'
    forwarded, _ = post(monkeypatch, raw)
    assert forwarded == [Forwarded(raw, {})]


def test_a_body_mentioning_rerank_elsewhere_is_parsed_and_forwarded_as_it_came(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw = b'{"query": {"match": {"title": "rerank"}}, "ext": {"other": {}}}'
    forwarded, _ = post(monkeypatch, raw)
    assert forwarded == [Forwarded(raw, {})]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"ext": {"\\u0072erank": {"query_context": {"query_text": "q"}}}}',
        '{"ext": {"rerank": {"query_context": {"query_text": "q"}}}}'.encode("utf-16"),
        '{"ext": {"rerank": {"query_context": {"query_text": "q"}}}}'.encode("utf-32-le"),
    ],
    ids=["escaped", "utf-16", "utf-32"],
)
def test_ext_rerank_however_json_spells_it_is_intercepted(
    monkeypatch: pytest.MonkeyPatch, raw: bytes
) -> None:
    forwarded, metrics = post(monkeypatch, raw, "?scroll=1m")
    (sent,) = forwarded
    assert sent.added_headers[intercept.SKIPPED_HEADER].startswith("scroll:")
    assert sent.body is not None
    assert json.loads(sent.body) == {}, "ext.rerank taken out"
    skipped = metrics.registry.get_sample_value(
        "sidecar_rerank_skipped_total", {"reason": "scroll"}
    )
    assert skipped == 1.0
