"""Indexes the sidecar did not make: discovery, configured profiles, lexical-only and neural
first stages, and reranking what the caller's `_search` really returns — against the real
cluster, with the real bi-encoder and the small real cross-encoder."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from opensearchpy import helpers
from sentence_transformers import CrossEncoder

from sidecar.config import ProfileConfig, SettingsError, parse_profiles
from sidecar.embedding import BiEncoder
from sidecar.indexing.corpus import read_corpus
from sidecar.indexing.sample import write_sample_corpus
from sidecar.retrieval.profiles import IndexProfile, MappingInfo, build_profile, match_profile
from sidecar.retrieval.queries import (
    build_lexical_search,
    build_vector_search,
    combine_filters,
)
from tests.integration.conftest import Cluster, profile_of
from tests.integration.sidecar_server import RunningSidecar, running_sidecar
from tests.integration.test_sidecar import post, ranks_alone

pytestmark = [pytest.mark.integration, pytest.mark.both_lines]

QUERY = "how do I make sure cleanup code runs even when an error is raised"
# Other field names than the sidecar's, the text inside an object, an extra nested object.
FOREIGN_MAPPING = {
    "settings": {"index": {"knn": True, "number_of_replicas": 0}},
    "mappings": {
        "properties": {
            "headline": {"type": "text"},
            "body": {"properties": {"en": {"type": "text"}, "words": {"type": "integer"}}},
            "authors": {"type": "nested", "properties": {"name": {"type": "keyword"}}},
            "section": {"type": "keyword"},
            "vec": {
                "type": "knn_vector",
                "dimension": 384,
                "space_type": "cosinesimil",
                "method": {"name": "hnsw", "engine": "lucene"},
            },
        }
    },
}


@pytest.fixture(scope="module")
def foreign_index(
    opensearch: Cluster, encoder: BiEncoder, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The sample corpus in an index made without the project's template."""
    name = f"test-foreign-{uuid.uuid4().hex[:8]}"
    corpus = tmp_path_factory.mktemp("foreign") / "pydoc.jsonl"
    write_sample_corpus(corpus)
    documents = list(read_corpus(corpus))
    vectors = encoder.embed([d.embedding_text for d in documents])
    opensearch.client.indices.create(index=name, body=FOREIGN_MAPPING)
    helpers.bulk(
        opensearch.client,
        (
            {
                "_index": name,
                "_id": doc.id,
                "_source": {
                    "headline": doc.title,
                    "body": {"en": doc.text, "words": len(doc.text.split())},
                    "authors": [{"name": "ada"}, {"name": f"author-{n % 3}"}],
                    "section": "even" if n % 2 == 0 else "odd",
                    "vec": vector,
                },
            }
            for n, (doc, vector) in enumerate(zip(documents, vectors, strict=True))
        ),
        refresh=True,
    )
    yield name
    opensearch.client.indices.delete(index=name, ignore_unavailable=True)


@pytest.fixture(scope="module")
def discovering_sidecar(
    opensearch: Cluster, encoder: BiEncoder, tiny_cross_encoder: Path, foreign_index: str
) -> Iterator[RunningSidecar]:
    with running_sidecar(opensearch.url, tiny_cross_encoder, encoder) as server:
        yield server


def get(url: str) -> tuple[int, dict[str, Any]]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def assert_provenance_exact(
    answer: dict[str, Any],
    cluster: Cluster,
    encoder: BiEncoder,
    profile: IndexProfile,
    index: str,
    candidates: int,
) -> None:
    """Each hit's per-retriever rank and score equal those of each subquery run alone."""
    filter_clause = combine_filters(profile, None)
    lexical = ranks_alone(
        cluster, build_lexical_search(profile, QUERY, candidates, filter_clause), index
    )
    vector = ranks_alone(
        cluster,
        build_vector_search(profile, QUERY, encoder.embed([QUERY])[0], candidates, filter_clause),
        index,
    )
    for hit in answer["hits"]:
        for name, alone in (("lexical", lexical), ("vector", vector)):
            reported = hit["sources"][name]
            if hit["id"] in alone:
                assert reported is not None, (name, hit["id"])
                assert reported["rank"] == alone[hit["id"]][0]
                assert reported["score"] == pytest.approx(alone[hit["id"]][1], rel=1e-5)
            else:
                assert reported is None, (name, hit["id"])


@pytest.mark.parametrize("fusion", ["convex", "rrf", "server"])
def test_discovered_profile_serves_a_foreign_index_with_exact_provenance(
    discovering_sidecar: RunningSidecar,
    opensearch: Cluster,
    encoder: BiEncoder,
    foreign_index: str,
    fusion: str,
) -> None:
    body = {"index": foreign_index, "query": QUERY, "k": 30, "candidates": 30, "fusion": fusion}
    status, answer, _ = post(f"{discovering_sidecar.url}/v1/search", body | {"rerank": False})
    assert status == 200, answer
    assert answer["first_stage"]["vector"] == "local"
    assert answer["first_stage"]["lexical_only"] is False
    assert answer["candidate_sources"]["both"] > 0
    assert all("vec" not in hit["source"] for hit in answer["hits"]), "the vector never comes back"
    assert all(hit["source"]["body"]["en"] for hit in answer["hits"])
    profile = profile_of(opensearch, foreign_index, encoder)
    assert_provenance_exact(answer, opensearch, encoder, profile, foreign_index, 30)
    status, reranked, _ = post(f"{discovering_sidecar.url}/v1/search", body)
    assert status == 200, reranked
    assert reranked["rerank"]["applied"] is True
    assert reranked["rerank"]["empty_text"] == 0, "headline and body.en are read"


def test_profile_endpoint_shows_each_part_and_its_origin(
    discovering_sidecar: RunningSidecar, foreign_index: str
) -> None:
    status, profile = get(f"{discovering_sidecar.url}/v1/indexes/{foreign_index}/profile")
    assert status == 200, profile
    # Discovered fields come in the order the mapping lists them (OpenSearch sorts by name).
    assert profile["lexical"] == {
        "fields": ["body.en", "headline"],
        "type": "best_fields",
        "tie_breaker": 0.5,
    }
    assert profile["vector"]["field"] == "vec"
    assert profile["vector"]["dimension"] == 384
    assert profile["rerank"]["document_fields"] == ["body.en", "headline"]
    assert profile["embed_on_write"] is False
    assert {"section", "authors.name", "body.words"} <= set(profile["filterable_fields"])
    assert profile["origins"]["lexical.fields"] == "discovered"
    assert profile["origins"]["lexical.tie_breaker"] == "default"


def test_filter_on_the_foreign_index(
    discovering_sidecar: RunningSidecar, foreign_index: str
) -> None:
    body = {"index": foreign_index, "query": QUERY, "k": 10, "candidates": 20, "rerank": False}
    status, answer, _ = post(
        f"{discovering_sidecar.url}/v1/search", body | {"filter": {"term": {"section": "odd"}}}
    )
    assert status == 200, answer
    assert answer["hits"]
    assert {hit["source"]["section"] for hit in answer["hits"]} == {"odd"}
    status, refused, _ = post(
        f"{discovering_sidecar.url}/v1/search", body | {"filter": {"term": {"sectoin": "odd"}}}
    )
    assert status == 400, refused
    assert "'sectoin'" in refused["error"]["reason"]


CONFIGURED = {
    "test-foreign-*": {
        "lexical": {"fields": ["headline^3", "body.en"], "tie_breaker": 0.2},
        "vector": {"field": "vec"},
        "rerank": {"document_fields": ["headline"], "max_chars_per_field": 40},
        "default_filter": {"term": {"section": "even"}},
    }
}


@pytest.fixture(scope="module")
def configured_sidecar(
    opensearch: Cluster, encoder: BiEncoder, tiny_cross_encoder: Path, foreign_index: str
) -> Iterator[RunningSidecar]:
    with running_sidecar(
        opensearch.url, tiny_cross_encoder, encoder, profiles=parse_profiles(CONFIGURED)
    ) as server:
        yield server


def test_configured_profile_shows_its_origins(
    configured_sidecar: RunningSidecar, foreign_index: str
) -> None:
    status, profile = get(f"{configured_sidecar.url}/v1/indexes/{foreign_index}/profile")
    assert status == 200, profile
    assert profile["profile"] == "test-foreign-*"
    assert profile["lexical"]["fields"] == ["headline^3", "body.en"]
    assert profile["origins"]["lexical.fields"] == "config"
    assert profile["origins"]["rerank.document_fields"] == "config"
    assert profile["origins"]["vector"] == "config"


@pytest.mark.parametrize("fusion", ["convex", "rrf", "server"])
def test_configured_profile_with_boosts_filter_and_its_own_rerank_fields(
    configured_sidecar: RunningSidecar,
    opensearch: Cluster,
    encoder: BiEncoder,
    tiny_cross_encoder: Path,
    foreign_index: str,
    fusion: str,
) -> None:
    body = {"index": foreign_index, "query": QUERY, "k": 20, "candidates": 20, "fusion": fusion}
    status, answer, _ = post(f"{configured_sidecar.url}/v1/search", body | {"rerank": False})
    assert status == 200, answer
    assert {hit["source"]["section"] for hit in answer["hits"]} == {"even"}
    configured = parse_profiles(CONFIGURED)
    profile = build_profile(
        foreign_index,
        match_profile(configured, foreign_index),
        MappingInfo.from_response(opensearch.client.indices.get_mapping(index=foreign_index)),
        local_model=encoder.model_name,
        local_dimensions={encoder.model_name: encoder.dimension},
        allow_lexical_only=False,
    )
    assert_provenance_exact(answer, opensearch, encoder, profile, foreign_index, 20)
    status, reranked, _ = post(f"{configured_sidecar.url}/v1/search", body | {"k": 10})
    assert status == 200, reranked
    model = CrossEncoder(str(tiny_cross_encoder), device="cpu", max_length=128)
    pairs = [(QUERY, hit["source"]["headline"][:40]) for hit in reranked["hits"]]
    own = model.predict(pairs, activation_fn=torch.nn.Identity(), convert_to_numpy=True)
    assert [h["rerank_score"] for h in reranked["hits"]] == pytest.approx(own.tolist(), abs=1e-4)


def test_profile_disagreeing_with_the_mapping_is_refused_at_start(
    opensearch: Cluster, encoder: BiEncoder, tiny_cross_encoder: Path, foreign_index: str
) -> None:
    profiles = {foreign_index: ProfileConfig.model_validate({"vector": {"field": "headline"}})}
    with (
        pytest.raises(SettingsError, match=r"'headline'.*vec \(knn_vector, dimension 384\)"),
        running_sidecar(opensearch.url, tiny_cross_encoder, encoder, profiles=profiles),
    ):
        pass


def test_index_without_a_usable_vector_is_refused_or_lexical_only(
    opensearch: Cluster, encoder: BiEncoder, tiny_cross_encoder: Path
) -> None:
    name = f"test-novector-{uuid.uuid4().hex[:8]}"
    opensearch.client.indices.create(
        index=name,
        body={
            "settings": {"index": {"knn": True, "number_of_replicas": 0}},
            "mappings": {
                "properties": {
                    "content": {"type": "text"},
                    "small": {"type": "knn_vector", "dimension": 8},
                }
            },
        },
    )
    try:
        opensearch.client.index(index=name, body={"content": "cleanup code runs"}, refresh=True)
        body = {"index": name, "query": "cleanup", "k": 1, "candidates": 5, "rerank": False}
        with running_sidecar(opensearch.url, tiny_cross_encoder, encoder) as server:
            status, refused, _ = post(f"{server.url}/v1/search", body)
        assert status == 400, refused
        assert "no knn_vector field of dimension 384" in refused["error"]["reason"]
        assert "small (knn_vector, dimension 8)" in refused["error"]["reason"]
        with running_sidecar(
            opensearch.url, tiny_cross_encoder, encoder, allow_lexical_only=True
        ) as server:
            status, answer, _ = post(f"{server.url}/v1/search", body)
        assert status == 200, answer
        assert answer["first_stage"]["lexical_only"] is True
        assert answer["candidate_sources"] == {"both": 0, "lexical_only": 1, "vector_only": 0}
        assert answer["hits"][0]["source"]["content"] == "cleanup code runs"
    finally:
        opensearch.client.indices.delete(index=name, ignore_unavailable=True)


def test_neural_profile_sends_the_clusters_model_id_and_relays_its_answer(
    opensearch: Cluster, encoder: BiEncoder, tiny_cross_encoder: Path, foreign_index: str
) -> None:
    """No model can be deployed in ml-commons offline here (README, "Neural profiles"), so this
    proves the query shape: the neural-search plugin parses the `neural` clause the sidecar sends
    and looks the model up, and its own answer comes back through the sidecar unchanged, in every
    fusion mode: 3.x answers 404 ("Fail(ed) to find model ..."), 2.19.1 a 500 ("Failed to get
    data object from index .plugins-ml-model")."""
    expected = 404 if opensearch.line >= 3 else 500
    profiles = parse_profiles(
        {foreign_index: {"vector": {"field": "vec", "embedding": "neural", "model_id": "absent"}}}
    )
    with running_sidecar(opensearch.url, tiny_cross_encoder, encoder, profiles=profiles) as server:
        status, profile = get(f"{server.url}/v1/indexes/{foreign_index}/profile")
        assert profile["vector"]["embedding"] == "neural"
        assert profile["vector"]["model"] == "absent"
        for fusion in ("convex", "rrf", "server"):
            status, answer, _ = post(
                f"{server.url}/v1/search",
                {"index": foreign_index, "query": QUERY, "fusion": fusion, "rerank": False},
            )
            direct = opensearch.client.transport.perform_request(
                "POST",
                f"/{foreign_index}/_search",
                body={"query": {"neural": {"vec": {"query_text": QUERY, "model_id": "absent"}}}},
                params={"ignore": [404, 500]},
            )
            assert status == expected == direct["status"], answer
            assert answer["error"]["reason"] == direct["error"]["reason"]


# Reranking what the caller's own `_search` returns.


def cross_encoder_order(model_dir: Path, texts: dict[str, str]) -> list[str]:
    model = CrossEncoder(str(model_dir), device="cpu", max_length=128)
    ids = list(texts)
    scores = model.predict(
        [(QUERY, texts[i]) for i in ids], activation_fn=torch.nn.Identity(), convert_to_numpy=True
    ).tolist()
    return [i for _, i in sorted(zip(scores, ids, strict=True), key=lambda pair: -pair[0])]


@pytest.mark.parametrize(
    ("source", "document_fields", "expected_source"),
    [
        (False, ["headline", "body.en"], None),
        (["headline"], ["headline", "body.en"], {"headline"}),
        (
            None,
            ["headline", "missing", "body.en"],
            {"headline", "body", "authors", "section", "vec"},
        ),
    ],
    ids=["source-false", "source-headline", "missing-field"],
)
def test_intercepted_search_reranks_the_real_text_whatever_source_is_asked(
    discovering_sidecar: RunningSidecar,
    opensearch: Cluster,
    tiny_cross_encoder: Path,
    foreign_index: str,
    source: Any,
    document_fields: list[str],
    expected_source: set[str] | None,
) -> None:
    body: dict[str, Any] = {
        "query": {"match": {"body.en": "exception cleanup finally"}},
        "size": 10,
        "ext": {
            "rerank": {
                "query_context": {"query_text": QUERY},
                "window": 10,
                "document_fields": document_fields,
            }
        },
    }
    if source is not None:
        body["_source"] = source
    status, answer, _ = post(f"{discovering_sidecar.url}/{foreign_index}/_search", body)
    assert status == 200, answer
    hits = answer["hits"]["hits"]
    assert answer["ext"]["rerank"]["applied"] is True
    assert answer["ext"]["rerank"]["empty_text"] == 0
    for hit in hits:
        assert "fields" not in hit, "the sidecar's own `fields` never reach the caller"
        if expected_source is None:
            assert "_source" not in hit
        else:
            assert set(hit["_source"]) == expected_source
    stored = {
        hit["_id"]: f"{hit['_source']['headline']} {hit['_source']['body']['en']}".strip()
        for hit in opensearch.client.search(
            index=foreign_index,
            body={"query": body["query"], "size": 10, "_source": ["headline", "body.en"]},
        )["hits"]["hits"]
    }
    assert [hit["_id"] for hit in hits] == cross_encoder_order(tiny_cross_encoder, stored)


def test_intercepted_search_keeps_the_callers_own_fields(
    discovering_sidecar: RunningSidecar, foreign_index: str
) -> None:
    body = {
        "query": {"match": {"body.en": "exception"}},
        "size": 3,
        "_source": False,
        "fields": ["section"],
        "ext": {"rerank": {"query_context": {"query_text": QUERY}, "window": 5}},
    }
    status, answer, _ = post(f"{discovering_sidecar.url}/{foreign_index}/_search", body)
    assert status == 200, answer
    assert all(set(hit["fields"]) == {"section"} for hit in answer["hits"]["hits"])


def test_hits_with_no_text_are_marked_and_kept_below_in_first_stage_order(
    discovering_sidecar: RunningSidecar, foreign_index: str
) -> None:
    counter = "sidecar_rerank_empty_text_total"
    before = _sample(discovering_sidecar, counter)
    body = {
        "query": {"match": {"body.en": "exception"}},
        "size": 5,
        "ext": {
            "rerank": {
                "query_context": {"query_text": QUERY},
                "window": 5,
                "document_fields": ["no_such_field"],
            }
        },
    }
    status, answer, _ = post(f"{discovering_sidecar.url}/{foreign_index}/_search", body)
    assert status == 200, answer
    hits = answer["hits"]["hits"]
    assert [h["_rerank"]["first_stage_rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert all(h["_rerank"]["empty_text"] is True for h in hits)
    assert all(h["_rerank"]["rerank_score"] is None for h in hits)
    assert answer["ext"]["rerank"]["empty_text"] == 5
    assert answer["ext"]["rerank"]["pairs_scored"] + answer["ext"]["rerank"]["cache_hits"] == 0
    assert _sample(discovering_sidecar, counter) == before + 5


def _sample(server: RunningSidecar, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0
