"""Indexes as production names them — an alias over two generations that share ids, a wildcard, a
comma list, a filtered alias, a data stream, a write alias rolled over — searched, intercepted and
written through the sidecar against the real cluster. A document is (index, id) throughout."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from opensearchpy import helpers
from sentence_transformers import CrossEncoder

from sidecar.embedding import BiEncoder
from sidecar.indexing.corpus import read_corpus
from sidecar.indexing.sample import write_sample_corpus
from sidecar.indexing.templates import VectorOptions, render_index_template
from sidecar.retrieval.profiles import discover_profile
from sidecar.retrieval.queries import build_lexical_search, build_vector_search
from tests.integration.conftest import Cluster
from tests.integration.sidecar_server import RunningSidecar, running_sidecar
from tests.integration.test_existing_indexes import get
from tests.integration.test_sidecar import post
from tests.integration.test_writes import client_for, cosine

pytestmark = [pytest.mark.integration, pytest.mark.both_lines]

QUERY = "how do I make sure cleanup code runs even when an error is raised"
# Documents of the first generation that the second one holds again, under the same ids.
REPEATED = 150
CANDIDATES = 60


@dataclass(frozen=True)
class Generations:
    """Two indexes from one template; the newer holds the first REPEATED ids again, revised."""

    prefix: str
    old: str
    new: str
    alias: str
    # "index/id" -> what the reranker reads of that document (title and text).
    texts: dict[str, str]


@pytest.fixture(scope="module")
def generations(
    opensearch: Cluster, encoder: BiEncoder, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Generations]:
    prefix = f"topo-{uuid.uuid4().hex[:8]}"
    old, new, alias = f"{prefix}-000001", f"{prefix}-000002", f"{prefix}-all"
    client = opensearch.client
    client.indices.put_index_template(
        name=prefix,
        body=render_index_template(f"{prefix}-*", VectorOptions(encoder.dimension), replicas=0),
    )
    corpus = tmp_path_factory.mktemp("topologies") / "pydoc.jsonl"
    write_sample_corpus(corpus)
    documents = list(read_corpus(corpus))
    texts: dict[str, str] = {}
    actions: list[dict[str, Any]] = []
    for index, docs, title in (
        (old, documents, "{}"),
        (new, documents[:REPEATED], "{} (revised)"),
    ):
        sources = [
            {"title": title.format(d.title), "text": d.text, "metadata": {"generation": index}}
            for d in docs
        ]
        vectors = encoder.embed([f"{s['title']} {s['text']}" for s in sources])
        for doc, source, vector in zip(docs, sources, vectors, strict=True):
            texts[f"{index}/{doc.id}"] = f"{source['title']} {source['text']}"
            actions.append(
                {"_index": index, "_id": doc.id, "_source": {**source, "embedding": vector}}
            )
    helpers.bulk(client, actions, refresh=True)
    client.indices.put_alias(index=f"{old},{new}", name=alias)
    yield Generations(prefix, old, new, alias, texts)
    client.indices.delete(index=f"{prefix}-*", ignore_unavailable=True)
    client.indices.delete_index_template(name=prefix, ignore=[404])


@pytest.fixture(scope="module")
def sidecar(
    opensearch: Cluster, encoder: BiEncoder, tiny_cross_encoder: Path
) -> Iterator[RunningSidecar]:
    with running_sidecar(
        opensearch.url, tiny_cross_encoder, encoder, max_body_bytes=8 * 1024 * 1024
    ) as server:
        yield server


def ranks_alone(cluster: Cluster, body: dict[str, Any], index: str) -> dict[str, tuple[int, float]]:
    """Each document of one subquery run alone on the cluster, as "index/id" -> (rank, score)."""
    hits = cluster.client.search(index=index, body=body)["hits"]["hits"]
    return {f"{h['_index']}/{h['_id']}": (rank, h["_score"]) for rank, h in enumerate(hits, 1)}


def key(hit: dict[str, Any]) -> str:
    return f"{hit['index']}/{hit['id']}"


@pytest.mark.parametrize("fusion", ["convex", "rrf", "server"])
@pytest.mark.parametrize("name", ["alias", "wildcard", "comma-list"])
def test_every_distinct_document_behind_a_name_comes_back_with_its_index(
    sidecar: RunningSidecar,
    opensearch: Cluster,
    encoder: BiEncoder,
    generations: Generations,
    name: str,
    fusion: str,
) -> None:
    index = {
        "alias": generations.alias,
        "wildcard": f"{generations.prefix}-*",
        "comma-list": f"{generations.old},{generations.new}",
    }[name]
    status, answer, _ = post(
        f"{sidecar.url}/v1/search",
        {
            "index": index,
            "query": QUERY,
            "k": CANDIDATES,
            "candidates": CANDIDATES,
            "fusion": fusion,
            "rerank": False,
        },
    )
    assert status == 200, answer
    hits = answer["hits"]
    keys = [key(hit) for hit in hits]
    assert len(set(keys)) == len(keys), "each (index, id) once"
    assert {hit["index"] for hit in hits} == {generations.old, generations.new}
    shared = {h["id"] for h in hits if h["index"] == generations.old} & {
        h["id"] for h in hits if h["index"] == generations.new
    }
    assert shared, "an id both generations hold comes back from each"
    # Provenance is exact against each subquery run alone on the same name, by (index, id).
    profile = discover_profile(
        index,
        opensearch.client.indices.get_mapping(index=index),
        encoder.model_name,
        encoder.dimension,
    )
    lexical = ranks_alone(opensearch, build_lexical_search(profile, QUERY, CANDIDATES), index)
    vector = ranks_alone(
        opensearch,
        build_vector_search(profile, QUERY, encoder.embed([QUERY])[0], CANDIDATES),
        index,
    )
    if fusion != "server":
        assert answer["candidates"] == min(CANDIDATES, len(lexical.keys() | vector.keys()))
    for hit in hits:
        for retriever, alone in (("lexical", lexical), ("vector", vector)):
            reported = hit["sources"][retriever]
            if key(hit) in alone:
                assert reported is not None, (retriever, key(hit))
                assert reported["rank"] == alone[key(hit)][0]
                assert reported["score"] == pytest.approx(alone[key(hit)][1], rel=1e-5)
            else:
                assert reported is None, (retriever, key(hit))


def test_reranked_hits_behind_an_alias_are_scored_on_their_own_generations_text(
    sidecar: RunningSidecar, generations: Generations, tiny_cross_encoder: Path
) -> None:
    body = {"index": generations.alias, "query": QUERY, "k": 40, "candidates": 40}
    status, answer, _ = post(f"{sidecar.url}/v1/search", body)
    assert status == 200, answer
    assert answer["rerank"]["applied"] is True
    hits = answer["hits"]
    model = CrossEncoder(str(tiny_cross_encoder), device="cpu", max_length=128)
    expected = model.predict(
        [(QUERY, generations.texts[key(hit)]) for hit in hits],
        activation_fn=torch.nn.Identity(),
        convert_to_numpy=True,
    )
    assert [h["rerank_score"] for h in hits] == pytest.approx(expected.tolist(), abs=1e-4)
    # Asked again, every score comes from the cache, each under its own (index, id).
    status, again, _ = post(f"{sidecar.url}/v1/search", body)
    assert status == 200, again
    assert again["rerank"]["cache_hits"] == len(hits)
    assert [(key(h), h["rerank_score"]) for h in again["hits"]] == [
        (key(h), h["rerank_score"]) for h in hits
    ]


@pytest.mark.parametrize("name", ["alias", "wildcard"])
def test_intercepted_search_on_a_name_keeps_each_hits_index(
    sidecar: RunningSidecar, opensearch: Cluster, generations: Generations, name: str
) -> None:
    index = generations.alias if name == "alias" else f"{generations.prefix}-*"
    query = {"multi_match": {"query": QUERY, "fields": ["title", "text"]}}
    direct = opensearch.client.search(
        index=index, body={"query": query, "size": 30, "_source": False}
    )["hits"]["hits"]
    body = {
        "query": query,
        "size": 30,
        "ext": {"rerank": {"query_context": {"query_text": QUERY}, "window": 30}},
    }
    status, answer, _ = post(f"{sidecar.url}/{index}/_search", body)
    assert status == 200, answer
    assert answer["ext"]["rerank"]["applied"] is True
    hits = answer["hits"]["hits"]
    assert sorted((h["_index"], h["_id"]) for h in hits) == sorted(
        (h["_index"], h["_id"]) for h in direct
    )
    assert {h["_index"] for h in hits} == {generations.old, generations.new}


def test_a_filtered_alias_keeps_its_filter(
    sidecar: RunningSidecar, opensearch: Cluster, generations: Generations
) -> None:
    alias = f"{generations.prefix}-revised"
    opensearch.client.indices.put_alias(
        index=f"{generations.prefix}-*",
        name=alias,
        body={"filter": {"term": {"metadata.generation": generations.new}}},
    )
    status, answer, _ = post(
        f"{sidecar.url}/v1/search",
        {"index": alias, "query": QUERY, "k": 30, "candidates": 50, "rerank": False},
    )
    assert status == 200, answer
    assert answer["hits"]
    assert {hit["index"] for hit in answer["hits"]} == {generations.new}
    assert answer["candidates"] <= REPEATED


def test_the_profile_of_a_name_lists_its_indexes(
    sidecar: RunningSidecar, generations: Generations
) -> None:
    status, profile = get(f"{sidecar.url}/v1/indexes/{generations.alias}/profile")
    assert status == 200, profile
    assert sorted(profile["indexes"]) == [generations.old, generations.new]
    assert profile["vector"]["field"] == "embedding"


def test_indexes_that_map_the_vector_differently_get_a_400_naming_each(
    sidecar: RunningSidecar, opensearch: Cluster, encoder: BiEncoder
) -> None:
    prefix = f"odd-{uuid.uuid4().hex[:8]}"
    for suffix, dimension in (("a", encoder.dimension), ("b", 8)):
        opensearch.client.indices.create(
            index=f"{prefix}-{suffix}",
            body={
                "settings": {"index": {"knn": True, "number_of_replicas": 0}},
                "mappings": {
                    "properties": {
                        "title": {"type": "text"},
                        "embedding": {"type": "knn_vector", "dimension": dimension},
                    }
                },
            },
        )
    try:
        status, answer, _ = post(
            f"{sidecar.url}/v1/search", {"index": f"{prefix}-*", "query": QUERY, "rerank": False}
        )
    finally:
        opensearch.client.indices.delete(index=f"{prefix}-*")
    assert status == 400, answer
    reason = answer["error"]["reason"]
    assert f"{prefix}-a: knn_vector, dimension {encoder.dimension}" in reason
    assert f"{prefix}-b: knn_vector, dimension 8" in reason
    assert answer["error"]["type"] == "illegal_argument_exception"


def written(count: int, start: int, generation: str) -> list[dict[str, Any]]:
    return [
        {
            "title": f"rollover note {n}",
            "text": f"cleanup code in a finally clause runs even when an error is raised ({n})",
            "metadata": {"generation": generation},
        }
        for n in range(start, start + count)
    ]


def test_writes_through_a_write_alias_get_vectors_across_a_rollover(
    sidecar: RunningSidecar, opensearch: Cluster, encoder: BiEncoder
) -> None:
    prefix = f"roll-{uuid.uuid4().hex[:8]}"
    alias, first = prefix, f"{prefix}-000001"
    client = opensearch.client
    client.indices.put_index_template(
        name=prefix,
        body=render_index_template(f"{prefix}-*", VectorOptions(encoder.dimension), replicas=0),
    )
    client.indices.create(index=first, body={"aliases": {alias: {"is_write_index": True}}})
    through = helpers.bulk
    try:
        through(
            client_for(sidecar),
            (
                {"_index": alias, "_id": str(n), "_source": d}
                for n, d in enumerate(written(20, 0, "first"))
            ),
            refresh=True,
        )
        rolled = client.indices.rollover(alias=alias)
        second = rolled["new_index"]
        assert rolled["rolled_over"] is True
        assert second != first
        # Ids 0-9 again: the second generation holds them too, as a reindex would.
        through(
            client_for(sidecar),
            (
                {"_index": alias, "_id": str(n), "_source": d}
                for n, d in enumerate(written(10, 0, "second"))
            ),
            refresh=True,
        )
        for index, expected in ((first, 20), (second, 10)):
            stored = list(helpers.scan(client, index=index, query={"query": {"match_all": {}}}))
            assert len(stored) == expected
            assert all(len(hit["_source"]["embedding"]) == encoder.dimension for hit in stored)
        # A partial update through the alias lands in the write index; its vector is made of
        # the stored text there with the new title (`_mget` on the alias itself is refused).
        client_for(sidecar).update(
            index=alias, id="3", body={"doc": {"title": "a revised title"}}, refresh=True
        )
        updated = client.get(index=second, id="3")["_source"]
        expected_vector = encoder.embed([f"a revised title {written(1, 3, 'second')[0]['text']}"])
        assert cosine(updated["embedding"], expected_vector[0]) > 0.999
        status, answer, _ = post(
            f"{sidecar.url}/v1/search",
            {"index": alias, "query": "cleanup when an error is raised", "k": 30, "candidates": 30},
        )
        assert status == 200, answer
        keys = [key(hit) for hit in answer["hits"]]
        assert len(keys) == 30 == len(set(keys))
        assert {hit["index"] for hit in answer["hits"]} == {first, second}
    finally:
        client.indices.delete(index=f"{prefix}-*", ignore_unavailable=True)
        client.indices.delete_index_template(name=prefix, ignore=[404])


def test_a_data_stream_is_written_and_searched_through_the_sidecar_across_a_rollover(
    sidecar: RunningSidecar, opensearch: Cluster, encoder: BiEncoder
) -> None:
    stream = f"logs-{uuid.uuid4().hex[:8]}"
    client = opensearch.client
    template = render_index_template(stream, VectorOptions(encoder.dimension), replicas=0)
    template["data_stream"] = {}
    client.indices.put_index_template(name=stream, body=template)

    def write(count: int, start: int) -> None:
        ok, errors = helpers.bulk(
            client_for(sidecar),
            (
                {
                    "_op_type": "create",
                    "_index": stream,
                    "_source": {**d, "@timestamp": "2026-12-07T00:00:00Z"},
                }
                for d in written(count, start, "stream")
            ),
            refresh=True,
        )
        assert (ok, errors) == (count, [])

    try:
        write(12, 0)
        client.transport.perform_request("POST", f"/{stream}/_rollover")
        write(8, 12)
        backing = [
            entry["index_name"]
            for entry in client.transport.perform_request("GET", f"/_data_stream/{stream}")[
                "data_streams"
            ][0]["indices"]
        ]
        assert len(backing) == 2
        status, answer, _ = post(
            f"{sidecar.url}/v1/search",
            {
                "index": stream,
                "query": "cleanup when an error is raised",
                "k": 20,
                "candidates": 20,
            },
        )
        assert status == 200, answer
        assert len(answer["hits"]) == 20
        assert {hit["index"] for hit in answer["hits"]} == set(backing)
        assert all(hit["sources"]["vector"] is not None for hit in answer["hits"]), (
            "every document was written with its vector"
        )
    finally:
        client.transport.perform_request("DELETE", f"/_data_stream/{stream}")
        client.indices.delete_index_template(name=stream, ignore=[404])
