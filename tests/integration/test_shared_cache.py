"""The shared score cache end to end: real sidecars sharing a real Redis (redis-server, started per
test), real OpenSearch, the small real cross-encoder. Redis is killed, frozen and restarted under
the sidecars to show that an outage costs searches nothing but the cache."""

from __future__ import annotations

import contextlib
import logging
import random
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from sidecar.embedding import BiEncoder
from sidecar.logging import JsonFormatter
from sidecar.rerank.shared_cache import KEY_PREFIX, OUTAGE_BACKOFF_S
from tests.integration.conftest import Cluster
from tests.integration.redis_server import RunningRedis, find_redis_server
from tests.integration.sidecar_server import RunningSidecar, metric_total, running_sidecar
from tests.integration.test_sidecar import QUERY, post

pytestmark = pytest.mark.integration

CANDIDATES = 10
# Each shared-cache call must end within this, whatever Redis does: the 0.05 s default timeout plus
# room for a busy event loop; a hang would be Redis's or the socket's own timeout (seconds).
CALL_BOUND_S = 0.5
# Twelve distinct questions about the sample corpus (Python's reference documentation).
QUERIES = (
    "how do I make sure cleanup code runs even when an error is raised",
    "what does the yield statement do in a function",
    "how are default argument values evaluated",
    "difference between is and == comparison",
    "how do context managers work with the with statement",
    "what happens when a class defines __getattr__",
    "how does name resolution work in nested scopes",
    "what is the order of evaluation of expressions",
    "how do I define an asynchronous generator",
    "what does the global statement mean",
    "how are keyword-only arguments declared",
    "what is a descriptor and how does __get__ work",
)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RunningRedis]:
    with RunningRedis(find_redis_server(), tmp_path / "redis") as server:
        yield server


class Replicas:
    """Sidecars over the sample index with the small cross-encoder, and searches through them."""

    def __init__(self, opensearch: Cluster, model: Path, encoder: BiEncoder, index: str) -> None:
        self._opensearch = opensearch
        self._model = model
        self._encoder = encoder
        self._index = index

    @contextlib.contextmanager
    def start(self, count: int, **overrides: Any) -> Iterator[list[RunningSidecar]]:
        """`count` sidecars with the same settings, each with its own local cache."""
        with contextlib.ExitStack() as stack:
            yield [
                stack.enter_context(
                    running_sidecar(self._opensearch.url, self._model, self._encoder, **overrides)
                )
                for _ in range(count)
            ]

    def search(self, server: RunningSidecar, query: str) -> dict[str, Any]:
        status, answer, _ = post(
            f"{server.url}/v1/search",
            {"index": self._index, "query": query, "k": CANDIDATES, "candidates": CANDIDATES},
        )
        assert status == 200, answer
        return answer


@pytest.fixture
def replicas(
    opensearch: Cluster, encoder: BiEncoder, tiny_cross_encoder: Path, pydoc_index: str
) -> Replicas:
    return Replicas(opensearch, tiny_cross_encoder, encoder, pydoc_index)


def shared(server: RunningSidecar, counter: str, result: str) -> float:
    """A count of sidecar_score_cache_shared_<counter>_total{result}: pairs, not calls."""
    return metric_total(server, f'sidecar_score_cache_shared_{counter}_total{{result="{result}"}}')


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s} s"
        time.sleep(0.05)


def calls_beyond(server: RunningSidecar, bound_s: float) -> float:
    """Shared-cache round trips (lookups and writes) that took longer than `bound_s` (a bucket)."""
    name = "sidecar_score_cache_shared_duration_seconds"
    return metric_total(server, f"{name}_count") - sum(
        metric_total(server, f'{name}_bucket{{le="{bound_s}",operation="{operation}"}}')
        for operation in ("get", "set")
    )


def scrape(server: RunningSidecar) -> str:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as response:
        text: str = response.read().decode()
    return text


def scores_by_id(answer: dict[str, Any]) -> dict[str, float]:
    return {hit["id"]: hit["rerank_score"] for hit in answer["hits"]}


def assert_scored_locally(answer: dict[str, Any]) -> None:
    assert answer["rerank"]["applied"] is True
    assert answer["rerank"]["fail_open"] is False
    assert answer["rerank"]["pairs_scored"] == CANDIDATES


def test_a_search_scored_on_one_replica_is_answered_from_redis_on_the_other(
    replicas: Replicas, redis_server: RunningRedis
) -> None:
    url = SecretStr(redis_server.url)
    with replicas.start(2, score_cache_url=url) as (a, b):
        scored = replicas.search(a, QUERY)
        assert scored["rerank"]["pairs_scored"] == CANDIDATES
        wait_until(lambda: shared(a, "writes", "stored") == CANDIDATES, 10, "A's write-behind")
        answered = replicas.search(b, QUERY)
        assert shared(b, "requests", "hit") == CANDIDATES
        again = replicas.search(b, QUERY)
        assert shared(b, "requests", "hit") == CANDIDATES, "B's own cache holds the copies"
    assert answered["rerank"]["cache_hits"] == CANDIDATES
    assert answered["rerank"]["pairs_scored"] == 0
    assert scores_by_id(answered) == scores_by_id(scored)
    assert again["rerank"]["cache_hits"] == CANDIDATES
    with redis_server.client() as client:
        keys = client.keys("*")
    assert len(keys) == CANDIDATES
    assert all(key.startswith(KEY_PREFIX.encode()) for key in keys)


def test_a_killed_redis_costs_searches_only_the_cache_and_is_used_again_once_back(
    replicas: Replicas, redis_server: RunningRedis
) -> None:
    url = SecretStr(redis_server.url)
    with replicas.start(2, score_cache_url=url) as servers:
        a, b = servers
        replicas.search(a, QUERIES[0])
        wait_until(lambda: shared(a, "writes", "stored") == CANDIDATES, 10, "A's write-behind")
        redis_server.kill()
        # New queries, so that every search needs Redis (its local cache misses); two searches
        # per replica inside one back-off: the first meets the error, the second skips Redis.
        for query in QUERIES[1:3]:
            for server in servers:
                assert_scored_locally(replicas.search(server, query))
        for server in servers:
            assert shared(server, "requests", "error") == CANDIDATES
            assert shared(server, "requests", "skipped") == CANDIDATES
            assert calls_beyond(server, CALL_BOUND_S) == 0
        redis_server.start()
        attempts = 0

        def shared_hit_on_b() -> bool:
            nonlocal attempts
            attempts += 1
            query = f"{QUERIES[3]} ({attempts})"  # new each time: no replica has it cached
            replicas.search(a, query)
            time.sleep(0.1)  # A's write-behind
            hits: int = replicas.search(b, query)["rerank"]["cache_hits"]
            return hits == CANDIDATES

        wait_until(shared_hit_on_b, OUTAGE_BACKOFF_S + 10, "shared hits after the restart")


def test_a_redis_that_stops_answering_costs_each_search_at_most_the_timeout(
    replicas: Replicas, redis_server: RunningRedis
) -> None:
    url = SecretStr(redis_server.url)
    with replicas.start(1, score_cache_url=url) as (sidecar,):
        replicas.search(sidecar, QUERIES[0])
        wait_until(lambda: shared(sidecar, "writes", "stored") == CANDIDATES, 10, "write-behind")
        redis_server.freeze()
        try:
            frozen = replicas.search(sidecar, QUERIES[1])
            assert shared(sidecar, "requests", "error") == CANDIDATES
            time.sleep(OUTAGE_BACKOFF_S)  # the back-off ends: the next search tries Redis again
            assert_scored_locally(replicas.search(sidecar, QUERIES[2]))
            assert shared(sidecar, "requests", "error") == 2 * CANDIDATES
            assert calls_beyond(sidecar, CALL_BOUND_S) == 0
        finally:
            redis_server.thaw()
    assert_scored_locally(frozen)


def test_the_redis_password_never_reaches_logs_or_metrics(
    replicas: Replicas, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    password = "pa55-Word-that-must-stay-secret"
    wrong = "Wr0ng-pa55word-also-secret"
    caplog.set_level(logging.DEBUG)
    shown: list[str] = []
    with RunningRedis(find_redis_server(), tmp_path / "redis", password=password) as redis_server:
        wrong_url = SecretStr(redis_server.url.replace(password, wrong))
        with replicas.start(1, score_cache_url=wrong_url) as (refused,):
            shown.append(str(replicas.search(refused, QUERIES[0])))
            assert shared(refused, "requests", "error") == CANDIDATES
            shown.append(scrape(refused))
        url = SecretStr(redis_server.url)
        with replicas.start(1, score_cache_url=url) as (sidecar,):
            shown.append(str(replicas.search(sidecar, QUERIES[1])))
            wait_until(lambda: shared(sidecar, "writes", "stored") == CANDIDATES, 10, "writes")
            redis_server.kill()
            shown.append(str(replicas.search(sidecar, QUERIES[2])))
            shown.append(scrape(sidecar))
    formatter = JsonFormatter()
    shown.extend(formatter.format(record) for record in caplog.records)
    outages = [line for line in shown if "shared score cache unavailable" in line]
    assert len(outages) == 2, "one warning per outage, each naming the error's type"
    assert "AuthenticationError" in outages[0]
    assert all(f"127.0.0.1:{redis_server.port}" in line for line in outages)
    assert not [line for line in shown if password in line or wrong in line]


def test_hit_ratio_of_two_replicas_with_and_without_a_shared_cache(
    replicas: Replicas,
    redis_server: RunningRedis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A figure, not an assertion: one stream of repeated queries sent round-robin."""
    stream = random.Random(13).choices(QUERIES, k=30)
    setups: list[tuple[str, int, dict[str, Any]]] = [
        ("2 replicas, shared Redis cache", 2, {"score_cache_url": SecretStr(redis_server.url)}),
        ("2 replicas, local caches only", 2, {}),
        ("1 replica", 1, {}),
    ]
    rows = []
    for name, count, overrides in setups:
        with replicas.start(count, **overrides) as servers:
            answers = [
                replicas.search(servers[turn % count], query) for turn, query in enumerate(stream)
            ]
        hits = sum(answer["rerank"]["cache_hits"] for answer in answers)
        scored = sum(answer["rerank"]["pairs_scored"] for answer in answers)
        rows.append(f"{name:<32} {hits / (hits + scored):>6.1%}  ({scored} pairs scored)")
    with capsys.disabled():
        print(f"\nscore-cache hit ratio, {len(stream)} searches of {len(set(stream))} queries:")
        print("\n".join(rows))
