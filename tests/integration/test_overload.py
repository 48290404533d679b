"""Overload is shed at admission: distinct reranked searches arriving at twice the rate the sidecar
serves them (measured first, one at a time) get 429s with Retry-After, never a 5xx, while the
admitted ones keep a latency bounded by the pending-pairs bound; a refused request costs the
cluster (almost) nothing, since admission is asked before the first stage. A recording proxy in
front of the node counts the first-stage searches. The overload table — share of 429s, admitted
p50/p99, refusal p50, upstream searches per refused request — is printed."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from sidecar.embedding import BiEncoder
from tests.integration.conftest import Cluster
from tests.integration.sidecar_server import running_sidecar
from tests.integration.test_identity import RecordingProxy
from tests.integration.test_sidecar import QUERY, post

pytestmark = pytest.mark.integration

CANDIDATES = 30
PENDING_PAIRS = 2 * CANDIDATES  # two requests' worth may wait for the model
OVERLOAD = 2.0  # arrivals per second, as a multiple of the rate served one at a time
ARRIVALS = 40


@pytest.fixture
def recorder(opensearch: Cluster) -> Iterator[RecordingProxy]:
    proxy = RecordingProxy(opensearch.url)
    yield proxy
    proxy.stop()


def test_overload_is_refused_at_admission_before_it_costs_the_cluster(
    recorder: RecordingProxy,
    encoder: BiEncoder,
    tiny_cross_encoder: Path,
    pydoc_index: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    admitted_s: list[float] = []
    refused_s: list[float] = []
    other: list[int] = []
    retry_after: list[int] = []
    lock = threading.Lock()
    queries = (f"{QUERY} {n}" for n in itertools.count())  # distinct: no score-cache hits

    def search(url: str) -> None:
        body = {"index": pydoc_index, "query": next(queries), "candidates": CANDIDATES}
        started = time.monotonic()
        status, _, headers = post(f"{url}/v1/search", body)
        elapsed = time.monotonic() - started
        with lock:
            if status == 200:
                admitted_s.append(elapsed)
            elif status == 429:
                refused_s.append(elapsed)
                retry_after.append(int(headers["Retry-After"]))
            else:
                other.append(status)

    with running_sidecar(
        recorder.url, tiny_cross_encoder, encoder, rerank_max_pending_pairs=PENDING_PAIRS
    ) as server:
        search(server.url)  # warm: the mapping read and the first embedding are not measured
        started = time.monotonic()
        for _ in range(5):
            search(server.url)
        rate = OVERLOAD * 5 / (time.monotonic() - started)
        admitted_s.clear()
        recorder.clear()
        with ThreadPoolExecutor(64) as pool:
            first = time.monotonic()
            for n in range(ARRIVALS):
                # Open loop: arrivals at a fixed rate, whatever the answers (pacing, not waiting).
                time.sleep(max(0.0, first + n / rate - time.monotonic()))
                pool.submit(search, server.url)
        searches = sum(path == "/_msearch" for _, path, _ in recorder.seen)
    requests = len(admitted_s) + len(refused_s) + len(other)
    cost = (searches - len(admitted_s)) / len(refused_s) if refused_s else 0.0
    with capsys.disabled():
        print(
            f"\noverload: {requests} requests of {CANDIDATES} candidates at {rate:.1f}/s "
            f"({OVERLOAD:g}x the rate served one at a time), "
            f"pending bound {PENDING_PAIRS} pairs; 429: {len(refused_s) / requests:.0%}; "
            f"admitted p50 {np.percentile(admitted_s, 50) * 1000:.0f} ms, "
            f"p99 {np.percentile(admitted_s, 99) * 1000:.0f} ms; "
            f"refused p50 {np.percentile(refused_s, 50) * 1000:.0f} ms; "
            f"upstream searches per refused request {cost:.3f}; other statuses {other}"
        )
    assert not other, "overload is a 429, never another status"
    assert refused_s, "the load is past what the bound admits"
    assert min(retry_after) >= 1
    # A request can pass admission and find the queue full after its first stage (a race the
    # estimate allows): rare, so a refusal costs well under one search on average.
    assert cost < 0.25
