"""The write path's handling of write bodies: which documents get a vector, what text it is made
of, and that every other byte of the body is forwarded as sent. The cluster's mapping and the
bi-encoder are fakes here (pure logic); tests/integration/test_writes.py uses the real ones."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from sidecar.embedding import EncoderPool
from sidecar.metrics import Metrics
from sidecar.retrieval.discovery import ProfileResolver
from sidecar.retrieval.transport import UpstreamError, error_body
from sidecar.write_path import EmbeddingFailed, WritePath, _with_vector

SIDECAR_MAPPING = {
    "mappings": {
        "_meta": {"sidecar": {"embed_on_write": True, "text_fields": ["title", "text"]}},
        "properties": {
            "title": {"type": "text"},
            "text": {"type": "text"},
            "embedding": {"type": "knn_vector", "dimension": 2},
        },
    }
}
PLAIN_MAPPING = {"mappings": {"properties": {"title": {"type": "text"}}}}


class FakeUpstream:
    """Mappings by index name; any other index is OpenSearch's 404."""

    async def mapping(self, index: str, headers: Any = None) -> dict[str, Any]:
        known = {"docs": SIDECAR_MAPPING, "plain": PLAIN_MAPPING}
        if index not in known:
            raise UpstreamError(404, error_body(404, "index_not_found_exception", index))
        return {index: known[index]}

    async def simulate_index(self, index: str, headers: Any = None) -> dict[str, Any]:
        """No template matches a new index here."""
        return {"overlapping": []}

    async def aliases(self, name: str, headers: Any = None) -> dict[str, Any]:
        """Every name here is a concrete index: no alias of that name."""
        raise UpstreamError(404, error_body(404, "aliases_not_found_exception", name))


class FakeEncoder:
    """A vector that records the text it was made of: [len(text), number of words]."""

    model_name = "fake"
    dimension = 2
    batch_size = 2

    def __init__(self, fail: bool = False) -> None:
        self.texts: list[str] = []
        self.fail = fail

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if self.fail:
            raise RuntimeError("model crashed")
        self.texts += texts
        return [[float(len(t)), float(len(t.split()))] for t in texts]


def write_path(encoder: FakeEncoder) -> WritePath:
    resolver = ProfileResolver(
        {},
        FakeUpstream(),  # type: ignore[arg-type]
        local_model="fake",
        local_dimensions={"fake": 2},
        allow_lexical_only=False,
        mapping_ttl_s=60,
    )
    return WritePath(
        resolver,
        EncoderPool(encoder),  # type: ignore[arg-type]
        ThreadPoolExecutor(1),
        Metrics(CollectorRegistry()),
    )


def ndjson(*lines: Any) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def vector_of(text: str) -> list[float]:
    return [float(len(text)), float(len(text.split()))]


def test_the_vector_is_inserted_into_the_text_as_sent() -> None:
    raw = '{ "title" : "A",\n "ratio": 1.50, "u": "\\u00e9" }'
    out = _with_vector_for(raw, ())
    assert out == raw[: raw.rindex("}")] + ',"embedding":[1.0,2.0]}'
    assert _with_vector_for("{}", ()) == '{"embedding":[1.0,2.0]}'
    update = '{"doc": {"title": "x"}, "doc_as_upsert": true}'
    assert _with_vector_for(update, ("doc",)) == (
        '{"doc": {"title": "x","embedding":[1.0,2.0]}, "doc_as_upsert": true}'
    )


def _with_vector_for(text: str, member: tuple[str, ...]) -> str:
    from sidecar.retrieval.profiles import MappingInfo, build_profile

    profile = build_profile(
        "docs",
        None,
        MappingInfo.from_response({"docs": SIDECAR_MAPPING}),
        local_model="fake",
        local_dimensions={"fake": 2},
        allow_lexical_only=False,
    )
    return _with_vector(text, member, profile, [1.0, 2.0])


def document(path: WritePath, index: str, body: bytes) -> bytes | None:
    """A single-document write as the write route makes it: the target's profile, then the body."""

    async def run() -> bytes | None:
        profile = await path.target(index)
        return None if profile is None else await path.document(profile, index, body, None)

    return asyncio.run(run())


def test_a_document_gets_the_vector_of_its_title_and_text() -> None:
    encoder = FakeEncoder()
    out = document(write_path(encoder), "docs", b'{"title": "T", "text": "body b"}')
    assert out is not None
    assert json.loads(out)["embedding"] == vector_of("T body b")


def test_documents_of_other_indexes_or_with_their_own_vector_pass_unchanged() -> None:
    path = write_path(FakeEncoder())
    assert asyncio.run(path.target("plain")) is None, "streams through unread"
    assert asyncio.run(path.target("absent")) is None
    own = b'{"title": "T", "embedding": [0, 1]}'
    assert document(path, "docs", own) is None
    assert document(path, "docs", b'{"other": 1}') is None, "no text, no vector"
    assert document(path, "docs", b"not json") is None, "OpenSearch refuses it"


def test_bulk_adds_vectors_only_where_needed_and_keeps_every_other_line() -> None:
    encoder = FakeEncoder()
    stored = {"old": {"title": "Stored", "text": "stored text"}}
    fetched: list[list[dict[str, Any]]] = []

    async def fetch(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        fetched.append(docs)
        return [
            {"found": d["_id"] in stored, "_source": stored.get(d["_id"])}
            if d["_id"] in stored
            else {"found": False}
            for d in docs
        ]

    body = ndjson(
        {"index": {"_index": "docs", "_id": "1"}},
        {"title": "One", "text": "first"},
        {"index": {"_index": "plain", "_id": "p"}},
        {"title": "Plain"},
        {"update": {"_id": "1"}},
        {"doc": {"title": "Uno"}},
        {"update": {"_id": "old"}},
        {"doc": {"text": "new text"}},
        {"update": {"_id": "meta"}},
        {"doc": {"metadata": {"k": "v"}}},
        {"delete": {"_id": "1"}},
        {"update": {"_id": "1"}},
        {"doc": {"title": "Again"}, "doc_as_upsert": True},
        {"update": {"_id": "s"}},
        {"script": {"source": "ctx._source.n += 1"}, "upsert": {"title": "Up", "text": "sert"}},
    )
    out = asyncio.run(write_path(encoder).bulk("docs", body, fetch))
    assert out is not None
    sent, received = body.split(b"\n"), out.split(b"\n")
    assert len(received) == len(sent)
    changed = {n for n, (a, b) in enumerate(zip(sent, received, strict=True)) if a != b}
    assert changed == {1, 5, 7, 12, 14}, "actions, the plain index and no-text updates as sent"
    lines = [json.loads(line) for line in received if line]
    assert lines[1]["embedding"] == vector_of("One first")
    assert lines[5]["doc"]["embedding"] == vector_of("Uno first"), "merged with the bulk's own"
    assert lines[7]["doc"]["embedding"] == vector_of("Stored new text"), "merged with the stored"
    assert lines[12]["doc"]["embedding"] == vector_of("Again"), "deleted before: nothing to merge"
    assert lines[14]["upsert"]["embedding"] == vector_of("Up sert")
    assert [d["_id"] for d in fetched[0]] == ["old"], "only what the bulk itself does not know"
    assert fetched[0][0]["_source"] == ["title", "text"]


def test_a_bulk_with_a_bad_action_line_is_forwarded_as_sent() -> None:
    body = b'{"index": {"_index": "docs"}}\n{"title": "x"}\nnot json\n'
    assert asyncio.run(write_path(FakeEncoder()).bulk(None, body, _no_fetch)) is None


def test_an_embedding_failure_refuses_the_whole_write() -> None:
    body = ndjson({"index": {"_index": "docs"}}, {"title": "x"})
    with pytest.raises(EmbeddingFailed):
        asyncio.run(write_path(FakeEncoder(fail=True)).bulk(None, body, _no_fetch))


async def _no_fetch(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    raise AssertionError("nothing to fetch")
