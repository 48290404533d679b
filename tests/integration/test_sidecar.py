"""The sidecar end to end: real app on a real port, real OpenSearch, real models, opensearch-py
pointed at the sidecar exactly as a user's client would be."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from opensearchpy import OpenSearch
from opensearchpy.exceptions import NotFoundError, RequestError, TransportError
from sentence_transformers import CrossEncoder

from sidecar.embedding import BiEncoder
from sidecar.rerank.backend import CrossEncoderBackend, ScoringPair
from sidecar.retrieval.profiles import read_text
from sidecar.retrieval.queries import build_lexical_search, build_vector_search
from tests.integration.conftest import Cluster, profile_of
from tests.integration.sidecar_server import RunningSidecar, metric_total, running_sidecar

pytestmark = [pytest.mark.integration, pytest.mark.both_lines]

QUERY = "how do I make sure cleanup code runs even when an error is raised"


@pytest.fixture(scope="module")
def sidecar(
    opensearch: Cluster, encoder: BiEncoder, tiny_cross_encoder: Path, pydoc_index: str
) -> Iterator[RunningSidecar]:
    with running_sidecar(opensearch.url, tiny_cross_encoder, encoder) as server:
        yield server


def post(
    url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def search(sidecar: RunningSidecar, **body: Any) -> dict[str, Any]:
    status, answer, _ = post(f"{sidecar.url}/v1/search", body)
    assert status == 200, answer
    return answer


def ranks_alone(cluster: Cluster, body: dict[str, Any], index: str) -> dict[str, tuple[int, float]]:
    hits = cluster.client.search(index=index, body=body)["hits"]["hits"]
    return {hit["_id"]: (rank, hit["_score"]) for rank, hit in enumerate(hits, start=1)}


@pytest.mark.parametrize("fusion", ["convex", "rrf", "server"])
def test_provenance_is_exact_against_each_subquery_alone(
    sidecar: RunningSidecar, opensearch: Cluster, encoder: BiEncoder, pydoc_index: str, fusion: str
) -> None:
    candidates = 40
    answer = search(
        sidecar,
        index=pydoc_index,
        query=QUERY,
        k=candidates,
        candidates=candidates,
        fusion=fusion,
        rerank=False,
    )
    profile = profile_of(opensearch, pydoc_index, encoder)
    lexical = ranks_alone(opensearch, build_lexical_search(profile, QUERY, candidates), pydoc_index)
    vector = ranks_alone(
        opensearch,
        build_vector_search(profile, QUERY, encoder.embed([QUERY])[0], candidates),
        pydoc_index,
    )
    assert answer["candidates"] <= 2 * candidates
    assert len(answer["hits"]) == candidates
    seen_in_one = 0
    for hit in answer["hits"]:
        for name, alone in (("lexical", lexical), ("vector", vector)):
            reported = hit["sources"][name]
            if hit["id"] in alone:
                rank, score = alone[hit["id"]]
                assert reported is not None, (name, hit["id"])
                assert reported["rank"] == rank
                assert reported["score"] == pytest.approx(score, rel=1e-5)
            else:
                assert reported is None, (name, hit["id"])
        seen_in_one += (hit["sources"]["lexical"] is None) != (hit["sources"]["vector"] is None)
    assert seen_in_one > 0, "the query should have candidates found by only one retriever"
    first_stage = [hit["first_stage"]["rank"] for hit in answer["hits"]]
    assert first_stage == list(range(1, candidates + 1)), "rerank off keeps the first-stage order"


def test_final_order_is_the_cross_encoders_own_order(
    sidecar: RunningSidecar, tiny_cross_encoder: Path, pydoc_index: str
) -> None:
    answer = search(sidecar, index=pydoc_index, query=QUERY, k=20, candidates=20)
    assert answer["rerank"]["applied"] is True
    assert answer["rerank"]["pairs_scored"] + answer["rerank"]["cache_hits"] == 20
    model = CrossEncoder(str(tiny_cross_encoder), device="cpu", max_length=128)
    pairs = [(QUERY, read_text(hit["source"], ("title", "text"))) for hit in answer["hits"]]
    import torch

    own = model.predict(pairs, activation_fn=torch.nn.Identity(), convert_to_numpy=True).tolist()
    assert [h["rerank_score"] for h in answer["hits"]] == pytest.approx(own, abs=1e-4)
    assert [h["id"] for h in answer["hits"]] == [
        h["id"] for _, h in sorted(zip(own, answer["hits"], strict=True), key=lambda pair: -pair[0])
    ]
    scores = [h["score"] for h in answer["hits"]]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 < s < 1.0 for s in scores), "sigmoid of the logit"
    assert set(answer["timings_ms"]) == {"embed", "retrieve", "rerank", "normalize", "total"}


def test_only_the_rerank_depth_is_reranked_and_the_rest_keep_first_stage_order(
    sidecar: RunningSidecar, pydoc_index: str
) -> None:
    answer = search(
        sidecar,
        index=pydoc_index,
        query=QUERY,
        k=20,
        candidates=20,
        rerank_depth=5,
        rerank_cache=False,
    )
    assert answer["rerank"]["pairs_scored"] == 5
    assert answer["rerank"]["below_depth"] == 15
    top, rest = answer["hits"][:5], answer["hits"][5:]
    assert sorted(h["first_stage"]["rank"] for h in top) == [1, 2, 3, 4, 5]
    assert all(h["rerank_score"] is not None and "below_depth" not in h for h in top)
    assert [h["first_stage"]["rank"] for h in rest] == list(range(6, 21))
    assert all(h["below_depth"] is True and h["rerank_score"] is None for h in rest)
    scores = [h["score"] for h in answer["hits"]]
    assert scores == sorted(scores, reverse=True), "scores never increase down the list"


def test_intercepted_search_takes_rerank_depth_and_truncation(
    sidecar: RunningSidecar, pydoc_index: str
) -> None:
    rerank = {"query_context": {"query_text": QUERY}, "window": 10, "rerank_depth": 3}
    body = {"query": {"match": {"text": "exception"}}, "size": 10, "ext": {"rerank": rerank}}
    status, answer, _ = post(f"{sidecar.url}/{pydoc_index}/_search", body)
    assert status == 200, answer
    hits = answer["hits"]["hits"]
    assert sorted(h["_rerank"]["first_stage_rank"] for h in hits[:3]) == [1, 2, 3]
    assert [h["_rerank"]["first_stage_rank"] for h in hits[3:]] == list(range(4, 11))
    assert all(h["_rerank"]["below_depth"] is True for h in hits[3:])
    assert answer["ext"]["rerank"]["below_depth"] == 7
    rerank.update(truncation="best_passage", rerank_depth=10)
    status, answer, _ = post(f"{sidecar.url}/{pydoc_index}/_search", body)
    assert status == 200, answer
    assert answer["ext"]["rerank"]["below_depth"] == 0
    rerank["truncation"] = "last"
    status, answer, _ = post(f"{sidecar.url}/{pydoc_index}/_search", body)
    assert status == 400
    assert "[ext.rerank.truncation] must be one of" in answer["error"]["reason"]


def test_repeated_request_is_served_from_the_score_cache(
    sidecar: RunningSidecar, pydoc_index: str
) -> None:
    body = {
        "index": pydoc_index,
        "query": "What does the WITH statement do?",
        "k": 5,
        "candidates": 30,
    }
    first = search(sidecar, **body)
    second = search(sidecar, **body)
    # The query exactly as sent is the key: a cased model would score this one apart.
    lower = search(sidecar, **(body | {"query": "what does the with statement do?"}))
    assert first["rerank"]["cache_hits"] == 0
    assert second["rerank"]["cache_hits"] == 30
    assert second["rerank"]["pairs_scored"] == 0
    assert [h["id"] for h in second["hits"]] == [h["id"] for h in first["hits"]]
    assert lower["rerank"]["cache_hits"] == 0


class StalledBackend:
    """The real cross-encoder behind a gate: scoring waits until the test opens it."""

    def __init__(self, inner: CrossEncoderBackend) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.identity, self.model_name = inner.identity, inner.model_name
        self.device, self.dtype, self.max_length = inner.device, inner.dtype, inner.max_length

    def prepare(self, *args: Any) -> list[list[ScoringPair]]:
        return self.inner.prepare(*args)

    def score(self, pairs: Sequence[ScoringPair]) -> list[float]:
        self.gate.wait(timeout=60)
        return self.inner.score(pairs)


@pytest.mark.parametrize("fail_mode", ["open", "closed"])
def test_slow_model_fails_open_to_the_first_stage_order_or_closed_with_503(
    opensearch: Cluster,
    encoder: BiEncoder,
    tiny_cross_encoder: Path,
    pydoc_index: str,
    fail_mode: str,
) -> None:
    backend = StalledBackend(
        CrossEncoderBackend(str(tiny_cross_encoder), device="cpu", dtype="float32", max_length=128)
    )
    with running_sidecar(
        opensearch.url,
        tiny_cross_encoder,
        encoder,
        backend=backend,
        request_timeout_s=1.0,
        fail_mode=fail_mode,
    ) as server:
        try:
            status, answer, _ = post(
                f"{server.url}/v1/search",
                {"index": pydoc_index, "query": QUERY, "k": 5, "candidates": 20},
            )
        finally:
            backend.gate.set()
    if fail_mode == "open":
        assert status == 200
        assert answer["rerank"] | {"model": None} == {
            "applied": False,
            "model": None,
            "device": "cpu",
            "dtype": "float32",
            "cache_hits": 0,
            "pairs_scored": 0,
            "fail_open": True,
            "reason": "deadline",
            "empty_text": 0,
            "below_depth": 0,
        }
        assert [h["first_stage"]["rank"] for h in answer["hits"]] == [1, 2, 3, 4, 5]
        assert all(h["rerank_score"] is None for h in answer["hits"])
    else:
        assert status == 503
        assert answer["error"]["type"] == "rerank_unavailable_exception"


class ScoringStarted(StalledBackend):
    """A StalledBackend that says when its first batch has reached the model."""

    def __init__(self, inner: CrossEncoderBackend) -> None:
        super().__init__(inner)
        self.entered = threading.Event()

    def score(self, pairs: Sequence[ScoringPair]) -> list[float]:
        self.entered.set()
        return super().score(pairs)


def test_admission_is_decided_before_any_work_and_a_large_request_alone_is_admitted(
    opensearch: Cluster, encoder: BiEncoder, tiny_cross_encoder: Path, pydoc_index: str
) -> None:
    """With a bound of 10 pending pairs, a 20-candidate request alone is admitted (never
    starved); while it is being scored, the next one gets a 429 with Retry-After before its
    embedding and first stage: no upstream call is made for it."""
    backend = ScoringStarted(
        CrossEncoderBackend(str(tiny_cross_encoder), device="cpu", dtype="float32", max_length=128)
    )
    body = {"index": pydoc_index, "query": QUERY, "candidates": 20}
    with (
        running_sidecar(
            opensearch.url,
            tiny_cross_encoder,
            encoder,
            backend=backend,
            rerank_max_pending_pairs=10,
        ) as server,
        ThreadPoolExecutor(1) as pool,
    ):
        first = pool.submit(post, f"{server.url}/v1/search", body)
        assert backend.entered.wait(60)
        before = metric_total(server, "sidecar_upstream_requests_total")
        status, answer, headers = post(
            f"{server.url}/v1/search", body | {"query": "another question entirely"}
        )
        assert metric_total(server, "sidecar_upstream_requests_total") == before, (
            "a refused request costs the cluster nothing"
        )
        backend.gate.set()
        first_status, first_answer, _ = first.result(timeout=120)
    assert status == 429
    assert answer["error"]["type"] == "rejected_execution_exception"
    assert int(headers["Retry-After"]) >= 1
    assert first_status == 200, first_answer
    assert first_answer["rerank"]["pairs_scored"] == 20


def test_intercepted_search_is_reranked_in_opensearch_shape(
    sidecar: RunningSidecar, opensearch: Cluster, pydoc_index: str
) -> None:
    through_sidecar = OpenSearch(hosts=[sidecar.url], timeout=120)
    body = {
        "query": {"match": {"text": "exception"}},
        "size": 5,
        "ext": {"rerank": {"query_context": {"query_text": QUERY}, "window": 30}},
    }
    answer = through_sidecar.search(index=pydoc_index, body=body)
    direct = opensearch.client.search(index=pydoc_index, body={"query": body["query"], "size": 30})
    direct_scores = {hit["_id"]: hit["_score"] for hit in direct["hits"]["hits"]}
    hits = answer["hits"]["hits"]
    assert len(hits) == 5
    assert answer["ext"]["rerank"]["applied"] is True
    for hit in hits:
        assert hit["_id"] in direct_scores
        assert hit["_rerank"]["first_stage_score"] == pytest.approx(direct_scores[hit["_id"]])
        assert list(direct_scores)[hit["_rerank"]["first_stage_rank"] - 1] == hit["_id"]
    assert [h["_score"] for h in hits] == sorted((h["_score"] for h in hits), reverse=True)
    assert answer["hits"]["max_score"] == hits[0]["_score"]
    assert answer["took"] >= 0


def test_intercepted_search_takes_from_and_size_from_the_url_first(
    sidecar: RunningSidecar, pydoc_index: str
) -> None:
    """As in OpenSearch, `?size=` and `?from=` win over the body's; the window is still what
    the cluster is asked for, so the page is cut from the reranked window."""
    through_sidecar = OpenSearch(hosts=[sidecar.url], timeout=120)
    body = {
        "query": {"match": {"text": "exception"}},
        "size": 20,
        "ext": {"rerank": {"query_context": {"query_text": QUERY}, "window": 10}},
    }
    whole = through_sidecar.search(index=pydoc_index, body=body, params={"size": "10"})
    page = through_sidecar.search(index=pydoc_index, body=body, params={"size": "3", "from": "2"})
    assert [h["_id"] for h in page["hits"]["hits"]] == [h["_id"] for h in whole["hits"]["hits"]][
        2:5
    ]
    with pytest.raises(RequestError, match="must not exceed"):
        through_sidecar.search(index=pydoc_index, body=body)


def test_compressed_requests_from_opensearch_py_work_on_every_path(
    sidecar: RunningSidecar, pydoc_index: str
) -> None:
    """`http_compress=True` gzips every request body: reranked searches, pass-through searches
    and writes must all work (a gzip pass-through used to hang until the upstream timeout)."""
    compressed = OpenSearch(hosts=[sidecar.url], http_compress=True, timeout=60)
    reranked = compressed.search(index=pydoc_index, body=RERANKED)
    assert reranked["ext"]["rerank"]["applied"] is True
    plain = compressed.search(index=pydoc_index, body={"query": {"match": {"text": "exception"}}})
    assert plain["hits"]["hits"]
    assert compressed.count(index=pydoc_index, body={"query": {"match_all": {}}})["count"] > 0
    written = compressed.index(
        index=pydoc_index, id="gzip-probe", body={"title": "t", "text": "gzip"}, refresh=True
    )
    assert written["result"] in {"created", "updated"}
    compressed.delete(index=pydoc_index, id="gzip-probe", refresh=True)


def test_search_without_rerank_ext_passes_through_untouched(
    sidecar: RunningSidecar, opensearch: Cluster, pydoc_index: str
) -> None:
    body = {"query": {"match": {"title": "statement"}}, "size": 7}
    through = OpenSearch(hosts=[sidecar.url]).search(index=pydoc_index, body=body)
    direct = opensearch.client.search(index=pydoc_index, body=body)
    assert [(h["_id"], h["_score"]) for h in through["hits"]["hits"]] == [
        (h["_id"], h["_score"]) for h in direct["hits"]["hits"]
    ]


def test_writes_and_reads_pass_through(sidecar: RunningSidecar, opensearch: Cluster) -> None:
    client = OpenSearch(hosts=[sidecar.url])
    index = "test-pass-through"
    try:
        client.indices.create(index=index, body={"settings": {"number_of_replicas": 0}})
        client.index(index=index, id="a", body={"title": "ü → unicode", "n": 1})
        client.bulk(
            body=[
                {"index": {"_index": index, "_id": str(i)}} if i % 2 == 0 else {"n": i}
                for i in range(200)
            ]
        )
        client.indices.refresh(index=index)
        assert (
            client.count(index=index)["count"]
            == opensearch.client.count(index=index)["count"]
            == 101
        )
        assert client.get(index=index, id="a")["_source"] == {"title": "ü → unicode", "n": 1}
        with pytest.raises(NotFoundError):
            client.get(index=index, id="absent")
        assert client.indices.exists(index=index) is True
    finally:
        opensearch.client.indices.delete(index=index, ignore_unavailable=True)


def test_request_id_is_honoured_or_generated(sidecar: RunningSidecar, pydoc_index: str) -> None:
    _, _, headers = post(
        f"{sidecar.url}/v1/search",
        {"index": pydoc_index, "query": "x", "rerank": False},
        {"X-Request-Id": "abc-123"},
    )
    assert headers["X-Request-Id"] == "abc-123"
    with urllib.request.urlopen(f"{sidecar.url}/_cluster/health") as response:
        assert len(response.headers["X-Request-Id"]) == 32


@pytest.mark.parametrize(
    ("body", "status", "error_type", "reason"),
    [
        (b"{not json", 400, "parsing_exception", "not valid JSON"),
        ([1, 2], 400, "parsing_exception", "must be a JSON object"),
        ({"index": "test-pydoc"}, 400, "illegal_argument_exception", "[query] is required"),
        (
            {"index": "test-pydoc", "query": "   "},
            400,
            "illegal_argument_exception",
            "[query] must not be empty",
        ),
        (
            {"index": "test-pydoc", "query": 5},
            400,
            "illegal_argument_exception",
            "[query] must be a string",
        ),
        (
            {"index": "test-pydoc", "query": "q", "k": "10"},
            400,
            "illegal_argument_exception",
            "[k] must be an integer",
        ),
        (
            {"index": "test-pydoc", "query": "q", "k": 50, "candidates": 20},
            400,
            "illegal_argument_exception",
            "must not exceed [candidates]",
        ),
        (
            {"index": "test-pydoc", "query": "q", "candidates": 5000},
            400,
            "illegal_argument_exception",
            "above the maximum 200",
        ),
        (
            {"index": "test-pydoc", "query": "q", "fusion": "magic"},
            400,
            "illegal_argument_exception",
            "[fusion] must be one of",
        ),
        (
            {"index": "test-pydoc", "query": "q", "weights": [1]},
            400,
            "illegal_argument_exception",
            "[weights] must be",
        ),
        (
            {"index": "test-pydoc", "query": "q", "querry": "typo"},
            400,
            "illegal_argument_exception",
            "unknown field(s) querry",
        ),
        (
            {"index": "no-such-index", "query": "q"},
            404,
            "index_not_found_exception",
            "no such index",
        ),
        (b"x" * (65 * 1024), 413, "content_too_long_exception", "larger than"),
        (
            b'{"index": "test-pydoc", "query": "q", "k": ' + b"9" * 4301 + b"}",
            400,
            "parsing_exception",
            "Number value length (4301) exceeds",
        ),
        (
            b'{"index": "test-pydoc", "query": "a", "query": "b"}',
            400,
            "parsing_exception",
            "Duplicate field 'query'",
        ),
        (
            b'{"index": "test-pydoc", "query": "caf\\ud800"}',
            400,
            "illegal_argument_exception",
            "unpaired UTF-16 surrogate",
        ),
    ],
)
def test_bad_input_gets_a_4xx_in_opensearch_error_shape(
    sidecar: RunningSidecar, pydoc_index: str, body: Any, status: int, error_type: str, reason: str
) -> None:
    got_status, answer, _ = post(f"{sidecar.url}/v1/search", body)
    assert got_status == status, answer
    assert answer["status"] == status
    assert answer["error"]["type"] == error_type
    assert answer["error"]["root_cause"][0]["type"] == error_type
    assert reason in answer["error"]["reason"]


def test_a_body_that_is_not_json_by_its_media_type_is_a_406(
    sidecar: RunningSidecar, opensearch: Cluster, pydoc_index: str
) -> None:
    body = json.dumps({"index": pydoc_index, "query": "q"}).encode()
    request = urllib.request.Request(
        f"{sidecar.url}/v1/search", data=body, headers={"Content-Type": "text/plain"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    with refused.value as answer:
        assert answer.code == 406
        assert json.loads(answer.read())["error"]["type"] == "media_type_header_exception"
    intercepted = urllib.request.Request(
        f"{sidecar.url}/{pydoc_index}/_search",
        data=json.dumps(RERANKED).encode(),
        headers={"Content-Type": "text/plain"},
    )
    with pytest.raises(urllib.error.HTTPError) as relayed:
        urllib.request.urlopen(intercepted, timeout=60)
    with relayed.value as answer:
        assert answer.code == 406, "the cluster's own answer to the same request"


# The paths only the sidecar has, and the methods each takes.
OWN_PATHS = {
    "/healthz": ("GET", "HEAD"),
    "/readyz": ("GET", "HEAD"),
    "/metrics": ("GET", "HEAD"),
    "/v1/search": ("POST",),
    "/v1/indexes/{index}/profile": ("GET", "HEAD"),
}


def send(method: str, url: str) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read(), dict(error.headers)


@pytest.mark.parametrize("path", sorted(OWN_PATHS))
def test_a_wrong_method_on_the_sidecars_own_paths_is_a_405_as_opensearch_words_it(
    sidecar: RunningSidecar, opensearch: Cluster, pydoc_index: str, path: str
) -> None:
    allowed = OWN_PATHS[path]
    uri = path.format(index=pydoc_index) + "?pretty"
    _, cluster_body, _ = send("PUT", f"{opensearch.url}/_cluster/health")
    for method in sorted({"GET", "POST", "PUT", "DELETE", "PATCH"} - set(allowed)):
        status, body, headers = send(method, f"{sidecar.url}{uri}")
        assert status == 405, (method, body)
        assert headers["Allow"] == ",".join(allowed)
        answer = json.loads(body)
        assert answer == {
            "error": f"Incorrect HTTP method for uri [{uri}] and method [{method}], "
            f"allowed: [{', '.join(allowed)}]",
            "status": 405,
        }
        assert answer.keys() == json.loads(cluster_body).keys(), "the cluster's own 405 shape"


def test_query_text_cannot_inject_query_dsl(sidecar: RunningSidecar, pydoc_index: str) -> None:
    hostile = '"}}, {"match_all": {}}, {"match": {"text": "'
    answer = search(sidecar, index=pydoc_index, query=hostile, k=5, candidates=10, rerank=False)
    assert len(answer["hits"]) == 5
    lexical_found = [h for h in answer["hits"] if h["sources"]["lexical"] is not None]
    assert all(h["sources"]["lexical"]["score"] > 0 for h in lexical_found)


def test_intercepted_search_with_bad_ext_is_a_400(
    sidecar: RunningSidecar, pydoc_index: str
) -> None:
    client = OpenSearch(hosts=[sidecar.url])
    with pytest.raises(RequestError) as raised:
        client.search(
            index=pydoc_index, body={"query": {"match_all": {}}, "ext": {"rerank": {"window": 10}}}
        )
    assert raised.value.status_code == 400
    with pytest.raises(TransportError) as too_small:
        client.search(
            index=pydoc_index,
            body={
                "size": 20,
                "ext": {"rerank": {"query_context": {"query_text": "q"}, "window": 10}},
            },
        )
    assert too_small.value.status_code == 400


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        # A body OpenSearch's parser refuses is OpenSearch's to answer, in its own words.
        (
            b'{"size": '
            + b"9" * 4301
            + b', "ext": {"rerank": {"query_context": {"query_text": "q"}}}}',
            "",
        ),
        (
            b'{"size": 1, "size": 2, "ext": {"rerank": {"query_context": {"query_text": "q"}}}}',
            "Duplicate field",
        ),
        (
            b'{"ext": {"rerank": {"query_context": {"query_text": "caf\\ud800"}}}}',
            "unpaired UTF-16 surrogate",
        ),
    ],
)
def test_intercepted_search_with_unparseable_input_is_a_400_never_a_500(
    sidecar: RunningSidecar, pydoc_index: str, body: bytes, reason: str
) -> None:
    status, answer, _ = post(f"{sidecar.url}/{pydoc_index}/_search", body)
    assert status == 400, answer
    assert reason in json.dumps(answer["error"])


RERANKED = {
    "query": {"match": {"text": "exception"}},
    "size": 3,
    "ext": {"rerank": {"query_context": {"query_text": QUERY}, "window": 10}},
}


def raw_post(url: str, body: bytes) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


@pytest.mark.parametrize(
    ("query", "skipped"),
    [
        ("format=yaml", "format"),
        ("format=cbor", "format"),
        ("stored_fields=_none_", "stored_fields"),
        ("scroll=1m", "scroll"),
        ("timeout=10s", None),
        ("ignore=404", None),
        ("request_timeout=5", None),
    ],
)
def test_every_search_parameter_gets_the_clusters_answer_reranked_or_said_why(
    sidecar: RunningSidecar, opensearch: Cluster, pydoc_index: str, query: str, skipped: str | None
) -> None:
    """A parameter that asks for another response shape gets the cluster's own answer, with a
    header naming it; any other reaches the cluster as sent (opensearch-py would take
    `timeout`, `ignore` and `request_timeout` for itself). Never a 5xx the cluster would not give."""
    body = json.dumps(RERANKED).encode()
    status, answer, headers = raw_post(f"{sidecar.url}/{pydoc_index}/_search?{query}", body)
    plain = json.dumps({k: v for k, v in RERANKED.items() if k != "ext"}).encode()
    direct_status, direct, _ = raw_post(f"{opensearch.url}/{pydoc_index}/_search?{query}", plain)
    assert status == direct_status, answer[:300]
    assert status < 500
    if skipped is not None:
        assert headers["X-Sidecar-Rerank-Skipped"].startswith(skipped)
    elif status == 200:
        assert json.loads(answer)["ext"]["rerank"]["applied"] is True
    else:
        assert json.loads(answer)["error"] == json.loads(direct)["error"]


def test_readiness_reports_models_and_upstream(sidecar: RunningSidecar) -> None:
    with urllib.request.urlopen(f"{sidecar.url}/readyz") as response:
        assert json.loads(response.read()) == {
            "ready": True,
            "models_loaded": True,
            "upstream": True,
        }
    with urllib.request.urlopen(f"{sidecar.url}/healthz") as response:
        assert response.status == 200


def test_bench_reports_sidecar_and_direct_figures(
    sidecar: RunningSidecar, opensearch: Cluster, encoder: BiEncoder, pydoc_index: str
) -> None:
    from sidecar.bench import benchmark

    summaries = benchmark(
        url=sidecar.url,
        opensearch_url=opensearch.url,
        index=pydoc_index,
        queries=["string formatting", "class definitions", "the global statement"],
        concurrency_levels=[2],
        duration_s=1.0,
        candidates=10,
        k=5,
        fusion="server",
        rerank=True,
        encoder=encoder,
    )
    assert [row["target"] for row in summaries] == ["sidecar", "opensearch"]
    for row in summaries:
        assert row["requests"] >= 2
        assert row["errors"] == 0
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    assert summaries[0]["pairs_per_s"] > 0
