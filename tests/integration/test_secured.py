"""The sidecar in front of a real security-plugin cluster (the project's secured 3.4.0 node, HTTPS
with the demo certificates): users, roles and role mappings are made through the security REST
API, with the roles of deploy/security/roles.yml. Each caller must get through the sidecar exactly
what the cluster gives them directly: the cluster's 401/403, only the documents their DLS role
shows (in hits, in `explain` and among the texts the reranker reads), no text an FLS role hides.
The cluster has no neural-search plugin, so it is also the test of a cluster without one."""

from __future__ import annotations

import base64
import io
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from sidecar.config import parse_profiles
from sidecar.embedding import BiEncoder
from sidecar.indexing.corpus import Document
from sidecar.indexing.loader import load_corpus
from sidecar.indexing.sample import sample_documents
from sidecar.indexing.templates import VectorOptions, create_index
from sidecar.local_opensearch.security import generate_password
from sidecar.logging import JsonFormatter
from sidecar.rerank.backend import CrossEncoderBackend, ScoringPair
from tests.integration.conftest import SecuredCluster
from tests.integration.sidecar_server import RunningSidecar, metric_total, running_sidecar

pytestmark = [pytest.mark.integration, pytest.mark.both_lines]

INDEX_A, INDEX_B = "sec-a", "sec-b"
QUERY = "how do I catch an exception and handle the error"
TOPICS = ("try", "exceptions", "raise", "with", "assert", "bltin-exceptions", "execmodel")
ROLES_FILE = Path(__file__).resolve().parents[2] / "deploy" / "security" / "roles.yml"
CHALLENGE = 'Basic realm="OpenSearch Security"'
SECURITY_API = "/_plugins/_security/api"


@dataclass(frozen=True)
class Corpus:
    red: frozenset[str]
    blue: frozenset[str]
    # Passages that only blue documents contain: none may reach the reranker for a red-only user.
    blue_snippets: frozenset[str]


@dataclass(frozen=True)
class Users:
    passwords: dict[str, str]

    def auth(self, user: str) -> dict[str, str]:
        token = base64.b64encode(f"{user}:{self.passwords[user]}".encode()).decode()
        return {"Authorization": f"Basic {token}"}


class RecordingBackend:
    """The real cross-encoder, recording every document text it is given to score."""

    def __init__(self, inner: CrossEncoderBackend) -> None:
        self.inner = inner
        self.texts: list[str] = []
        self.identity, self.model_name = inner.identity, inner.model_name
        self.device, self.dtype, self.max_length = inner.device, inner.dtype, inner.max_length

    def prepare(self, query: str, texts: Sequence[str], *args: Any) -> list[list[ScoringPair]]:
        self.texts.extend(texts)
        return self.inner.prepare(query, texts, *args)

    def score(self, pairs: Sequence[ScoringPair]) -> list[float]:
        return self.inner.score(pairs)


def request(
    url: str, body: Any = None, headers: dict[str, str] | None = None, method: str = "POST"
) -> tuple[int, str, dict[str, str]]:
    """(status, raw body, headers): a 401 from the security plugin is plain text, not JSON."""
    data = None if body is None else json.dumps(body).encode()
    sent = {"Content-Type": "application/json", **(headers or {})}
    outgoing = urllib.request.Request(url, data=data, headers=sent, method=method)
    try:
        with urllib.request.urlopen(outgoing, timeout=120) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), dict(error.headers)


def native(
    sidecar: RunningSidecar, headers: dict[str, str], index: str = INDEX_A, **body: Any
) -> tuple[int, dict[str, Any]]:
    search = {"index": index, "query": QUERY, "k": 10, "candidates": 40} | body
    status, text, _ = request(f"{sidecar.url}/v1/search", search, headers)
    return status, json.loads(text)


def intercepted(
    sidecar: RunningSidecar, headers: dict[str, str], index: str = INDEX_A
) -> tuple[int, dict[str, Any]]:
    body = {
        "query": {"multi_match": {"query": QUERY, "fields": ["title", "text"]}},
        "size": 10,
        "ext": {"rerank": {"query_context": {"query_text": QUERY}, "window": 40}},
    }
    status, text, _ = request(f"{sidecar.url}/{index}/_search", body, headers)
    return status, json.loads(text)


def example_role(name: str, patterns: list[str], **index_rule: Any) -> dict[str, Any]:
    """A role of deploy/security/roles.yml with the test's index patterns (and DLS/FLS)."""
    role: dict[str, Any] = yaml.safe_load(ROLES_FILE.read_text())[name]
    for permission in role["index_permissions"]:
        permission["index_patterns"] = patterns
        permission.update(index_rule)
    return role


@pytest.fixture(scope="module")
def users(secured_opensearch: SecuredCluster) -> Iterator[Users]:
    """The test's users and their roles; `own_index`, which the demo configuration maps to
    every user and which grants _msearch, is mapped to nobody for the module."""
    admin = secured_opensearch.admin
    readers = {
        "reader_a": example_role("sidecar_search", [INDEX_A]),
        "dls_user": example_role(
            "sidecar_search", [INDEX_A], dls=json.dumps({"term": {"metadata.team": "red"}})
        ),
        "fls_user": example_role("sidecar_search", [INDEX_A], fls=["~text"]),
        "no_msearch_user": example_role("sidecar_search", [INDEX_A]) | {"cluster_permissions": []},
        "sidecar_service": example_role("sidecar_service", ["sec-*"]),
        "all_reader": example_role("sidecar_search", ["sec-*"]),
    }
    passwords = {name: generate_password() for name in readers}
    for name, role in readers.items():
        admin.transport.perform_request("PUT", f"{SECURITY_API}/roles/{name}_role", body=role)
        admin.transport.perform_request(
            "PUT", f"{SECURITY_API}/internalusers/{name}", body={"password": passwords[name]}
        )
        admin.transport.perform_request(
            "PUT", f"{SECURITY_API}/rolesmapping/{name}_role", body={"users": [name]}
        )
    own_index = admin.transport.perform_request("GET", f"{SECURITY_API}/rolesmapping/own_index")
    admin.transport.perform_request(
        "PUT", f"{SECURITY_API}/rolesmapping/own_index", body={"users": []}
    )
    passwords["admin"] = secured_opensearch.admin_password
    yield Users(passwords)
    admin.transport.perform_request(
        "PUT",
        f"{SECURITY_API}/rolesmapping/own_index",
        body={"users": own_index["own_index"]["users"]},
    )
    for name in readers:
        admin.transport.perform_request("DELETE", f"{SECURITY_API}/internalusers/{name}")
        admin.transport.perform_request("DELETE", f"{SECURITY_API}/rolesmapping/{name}_role")
        admin.transport.perform_request("DELETE", f"{SECURITY_API}/roles/{name}_role")


@pytest.fixture(scope="module")
def corpus(
    secured_opensearch: SecuredCluster,
    users: Users,
    encoder: BiEncoder,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Corpus]:
    """Index A: pydoc sections about exceptions, alternately team red and blue; index B: a few
    of the same. Both are created by the sidecar's service account with the example role."""
    service = secured_opensearch.client("sidecar_service", users.passwords["sidecar_service"])
    documents = [d for d in sample_documents() if d.metadata["topic"] in TOPICS]
    teams = {d.id: ("red", "blue")[position % 2] for position, d in enumerate(documents)}
    folder = tmp_path_factory.mktemp("secured")
    for index, chosen in ((INDEX_A, documents), (INDEX_B, documents[:12])):
        report = create_index(service, index, VectorOptions(dimension=encoder.dimension))
        # 3.4.0's secured node has no neural-search: the index alone; 2.19.1's has the pipelines.
        assert bool(report.pipelines) == secured_opensearch.has_neural_search
        path = folder / f"{index}.jsonl"
        path.write_text(
            "".join(
                json.dumps(
                    {"_id": d.id, "title": d.title, "text": d.text, "metadata": _team(d, teams)}
                )
                + "\n"
                for d in chosen
            )
        )
        load_corpus(secured_opensearch.admin, encoder, index, path, show_progress=False)
    red_texts = " ".join(d.text for d in documents if teams[d.id] == "red")
    yield Corpus(
        red=frozenset(i for i, team in teams.items() if team == "red"),
        blue=frozenset(i for i, team in teams.items() if team == "blue"),
        blue_snippets=frozenset(
            d.text[:60]
            for d in documents
            if teams[d.id] == "blue" and len(d.text) >= 60 and d.text[:60] not in red_texts
        ),
    )
    for index in (INDEX_A, INDEX_B):
        secured_opensearch.admin.indices.delete(index=index, ignore_unavailable=True)


def _team(document: Document, teams: dict[str, str]) -> dict[str, Any]:
    return {**document.metadata, "team": teams[document.id]}


@pytest.fixture(scope="module")
def sidecar_log() -> Iterator[io.StringIO]:
    """Every log line of the module's sidecars, as the sidecar writes them (JSON, with extras)."""
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield captured
    root.removeHandler(handler)
    root.setLevel(previous)


@pytest.fixture(scope="module")
def sidecar(
    secured_opensearch: SecuredCluster,
    users: Users,
    corpus: Corpus,
    encoder: BiEncoder,
    tiny_cross_encoder: Path,
    sidecar_log: io.StringIO,
) -> Iterator[tuple[RunningSidecar, RecordingBackend]]:
    """Forward mode (the default) with the CA bundle, and the service account for its own calls."""
    backend = RecordingBackend(
        CrossEncoderBackend(str(tiny_cross_encoder), device="cpu", dtype="float32", max_length=128)
    )
    with running_sidecar(
        secured_opensearch.url,
        tiny_cross_encoder,
        encoder,
        backend=backend,
        upstream_ca_certs=secured_opensearch.ca_certs,
        service_username="sidecar_service",
        service_password=SecretStr(users.passwords["sidecar_service"]),
        # The reranker reads the passage alone (titles are short and repeat across sections).
        profiles=parse_profiles({INDEX_A: {"rerank": {"document_fields": ["text"]}}}),
    ) as server:
        yield server, backend


ROUTES = (
    ("POST", "/v1/search", {"index": INDEX_A, "query": QUERY}),
    (
        "POST",
        f"/{INDEX_A}/_search",
        {
            "query": {"match": {"text": "error"}},
            "ext": {"rerank": {"query_context": {"query_text": QUERY}}},
        },
    ),
    ("POST", f"/{INDEX_A}/_search", {"query": {"match": {"text": "error"}}}),
    ("POST", "/_msearch", None),
    ("GET", f"/v1/indexes/{INDEX_A}/profile", None),
    ("PUT", f"/{INDEX_A}/_doc/new-1", {"title": "t", "text": "x"}),
    ("GET", "/_cat/indices", None),
)


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
@pytest.mark.parametrize("credentials", ["none", "wrong_password"])
def test_without_valid_credentials_every_route_answers_the_clusters_401(
    sidecar: tuple[RunningSidecar, RecordingBackend],
    users: Users,
    method: str,
    path: str,
    body: Any,
    credentials: str,
) -> None:
    server, _ = sidecar
    headers = {}
    if credentials == "wrong_password":
        token = base64.b64encode(b"reader_a:not-the-password").decode()
        headers = {"Authorization": f"Basic {token}"}
    status, text, answer_headers = request(f"{server.url}{path}", body, headers, method)
    assert status == 401, text
    assert answer_headers.get("WWW-Authenticate") == CHALLENGE
    assert text == "Unauthorized"


def test_the_sidecars_readiness_uses_its_service_account(
    sidecar: tuple[RunningSidecar, RecordingBackend],
) -> None:
    server, _ = sidecar
    status, text, _ = request(f"{server.url}/readyz", method="GET")
    assert status == 200, text


@pytest.mark.parametrize("route", ["native", "interception"])
def test_a_reader_of_index_a_gets_403_on_index_b_even_after_admin_warmed_the_caches(
    sidecar: tuple[RunningSidecar, RecordingBackend], users: Users, route: str
) -> None:
    server, _ = sidecar
    call = native if route == "native" else intercepted
    status, answer = call(server, users.auth("admin"), INDEX_B)
    assert status == 200, answer
    status, answer = call(server, users.auth("reader_a"), INDEX_A)
    assert status == 200, answer
    status, answer = call(server, users.auth("reader_a"), INDEX_B)
    assert status == 403, answer
    assert answer["error"]["type"] == "security_exception"
    assert "no permissions" in answer["error"]["reason"]


@pytest.mark.parametrize("fusion", ["convex", "rrf"])
def test_a_dls_user_never_sees_a_hidden_document_anywhere(
    sidecar: tuple[RunningSidecar, RecordingBackend],
    users: Users,
    corpus: Corpus,
    fusion: str,
) -> None:
    server, backend = sidecar
    status, warm = native(server, users.auth("admin"), fusion=fusion, explain=True)
    assert status == 200, warm
    assert {hit["id"] for hit in warm["hits"]} & corpus.blue, "the query finds blue documents"
    # Once with the score cache bypassed, so every candidate's text goes to the reranker; once
    # with it warm from the admin's request.
    for read_cache in (False, True):
        backend.texts.clear()
        status, answer = native(
            server, users.auth("dls_user"), fusion=fusion, explain=True, rerank_cache=read_cache
        )
        assert status == 200, answer
        ids = {hit["id"] for hit in answer["hits"]}
        retrieved = {hit["id"] for hits in answer["retrievers"].values() for hit in hits}
        assert ids
        assert ids <= corpus.red
        assert retrieved <= corpus.red
        assert answer["candidates"] <= len(corpus.red)
        report = answer["rerank"]
        assert report["pairs_scored"] + report["cache_hits"] == answer["candidates"]
        if not read_cache:
            assert report["pairs_scored"] == answer["candidates"] == len(backend.texts)
            assert not any(
                snippet in text for text in backend.texts for snippet in corpus.blue_snippets
            )


def test_a_dls_user_through_the_interception_sees_only_their_documents(
    sidecar: tuple[RunningSidecar, RecordingBackend], users: Users, corpus: Corpus
) -> None:
    server, _ = sidecar
    status, answer = intercepted(server, users.auth("dls_user"))
    assert status == 200, answer
    ids = {hit["_id"] for hit in answer["hits"]["hits"]}
    assert ids
    assert ids <= corpus.red


def test_fields_hidden_by_fls_are_marked_as_no_rerank_text_not_scored(
    sidecar: tuple[RunningSidecar, RecordingBackend], users: Users
) -> None:
    server, _ = sidecar
    status, answer = native(server, users.auth("fls_user"))
    assert status == 200, answer
    assert answer["hits"], "titles and vectors are still visible to this user"
    assert all(hit["empty_text"] for hit in answer["hits"])
    assert answer["rerank"]["pairs_scored"] == 0
    assert answer["rerank"]["empty_text"] == answer["candidates"]


def test_a_user_without_the_msearch_permission_can_still_search(
    sidecar: tuple[RunningSidecar, RecordingBackend],
    users: Users,
    secured_opensearch: SecuredCluster,
) -> None:
    server, _ = sidecar
    direct = secured_opensearch.client("no_msearch_user", users.passwords["no_msearch_user"])
    with pytest.raises(Exception, match=r"403|security_exception"):
        direct.msearch(body=[{"index": INDEX_A}, {"query": {"match_all": {}}}])
    before = metric_total(server, "sidecar_msearch_fallback_total")
    status, answer = native(server, users.auth("no_msearch_user"))
    assert status == 200, answer
    assert answer["hits"]
    assert metric_total(server, "sidecar_msearch_fallback_total") == before + 1


def test_server_fusion_is_the_clusters_or_a_clear_400_where_it_has_no_neural_search(
    sidecar: tuple[RunningSidecar, RecordingBackend],
    users: Users,
    corpus: Corpus,
    secured_opensearch: SecuredCluster,
) -> None:
    server, _ = sidecar
    status, answer = native(server, users.auth("reader_a"), fusion="server")
    if not secured_opensearch.has_neural_search:  # 3.4.0
        assert status == 400, answer
        assert "neural-search" in answer["error"]["reason"]
        assert "convex" in answer["error"]["reason"]
        return
    assert status == 200, answer  # 2.19.1
    assert answer["first_stage"]["fusion_fallback"] is None
    # A DLS role's hybrid query fails in 2.19.1's security plugin (security #6416): the sidecar
    # fuses the same subqueries itself (convex), flagged, and still only the role's documents.
    status, answer = native(server, users.auth("dls_user"), fusion="server", explain=True)
    assert status == 200, answer
    assert answer["first_stage"]["fusion_fallback"] == "dls_hybrid"
    assert {hit["id"] for hit in answer["hits"]} <= corpus.red
    assert {hit["id"] for hits in answer["retrievers"].values() for hit in hits} <= corpus.red


def test_the_demo_certificate_is_refused_without_the_ca_bundle(
    secured_opensearch: SecuredCluster,
    users: Users,
    encoder: BiEncoder,
    tiny_cross_encoder: Path,
) -> None:
    with running_sidecar(secured_opensearch.url, tiny_cross_encoder, encoder) as server:
        status, answer = native(server, users.auth("reader_a"), rerank=False)
    assert status == 502, answer
    assert answer["error"]["type"] == "upstream_tls_error"


def test_eval_measures_through_a_forwarding_sidecar_as_the_user_it_is_given(
    sidecar: tuple[RunningSidecar, RecordingBackend], users: Users, corpus: Corpus
) -> None:
    from sidecar.evaluation import EvalError, EvalOptions, run_evaluation

    server, _ = sidecar
    queries = {"q1": QUERY}
    qrels = {"q1": dict.fromkeys(sorted(corpus.red)[:3], 1)}
    options = EvalOptions(modes=("bm25", "knn", "hybrid"), k=5, candidates=10, progress=False)
    with pytest.raises(EvalError, match="the sidecar answered 401"):
        run_evaluation(server.url, INDEX_A, qrels, queries, options)
    as_reader = replace(options, headers=users.auth("reader_a"))
    assert users.passwords["reader_a"] not in repr(as_reader)
    report = run_evaluation(server.url, INDEX_A, qrels, queries, as_reader)
    assert report["queries"] == 1
    assert set(report["quality"]) == {"bm25", "knn", "hybrid"}
    assert report["quality"]["hybrid"]["ndcg@10"] > 0


def test_one_callers_searches_are_no_cache_hits_for_another(
    sidecar: tuple[RunningSidecar, RecordingBackend], users: Users
) -> None:
    """Forward mode keeps each caller's scores apart: `all_reader` and `reader_a` read the same
    documents, and neither learns from the cache (hits, or their speed) what the other searched."""
    server, _ = sidecar
    query = "which exception is raised when a dictionary key is missing"
    answers = [
        native(server, users.auth(user), query=query, explain=True)
        for user in ("all_reader", "reader_a", "all_reader")
    ]
    assert all(status == 200 for status, _ in answers), answers
    (_, first), (_, other), (_, again) = answers
    assert [h["id"] for h in first["hits"]] == [h["id"] for h in other["hits"]]
    scored = first["candidates"]
    assert scored > 0
    assert (first["rerank"]["cache_hits"], first["rerank"]["pairs_scored"]) == (0, scored)
    assert (other["rerank"]["cache_hits"], other["rerank"]["pairs_scored"]) == (0, scored)
    assert (again["rerank"]["cache_hits"], again["rerank"]["pairs_scored"]) == (scored, 0)


def test_cache_figures_are_not_reported_unless_the_operator_asks(
    secured_opensearch: SecuredCluster,
    users: Users,
    corpus: Corpus,
    encoder: BiEncoder,
    tiny_cross_encoder: Path,
) -> None:
    with running_sidecar(
        secured_opensearch.url,
        tiny_cross_encoder,
        encoder,
        upstream_ca_certs=secured_opensearch.ca_certs,
        report_cache_stats=False,
    ) as server:
        status, answer = native(server, users.auth("reader_a"))
        assert status == 200, answer
        assert answer["rerank"]["applied"] is True
        assert (answer["rerank"]["cache_hits"], answer["rerank"]["pairs_scored"]) == (None, None)
        status, answer = intercepted(server, users.auth("reader_a"))
        assert status == 200, answer
        assert answer["ext"]["rerank"]["cache_hits"] is None


def test_no_password_or_authorization_value_reaches_the_sidecars_log(
    sidecar: tuple[RunningSidecar, RecordingBackend], users: Users, sidecar_log: io.StringIO
) -> None:
    """Runs last in the module: the log then holds every request the tests above sent."""
    server, _ = sidecar
    native(server, users.auth("reader_a"))
    written = sidecar_log.getvalue()
    assert '"stage": "retrieve"' in written, "the log was captured"
    for user, password in users.passwords.items():
        assert password not in written, user
        assert users.auth(user)["Authorization"].split()[1] not in written, user
