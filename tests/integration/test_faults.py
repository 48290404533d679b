"""Faults between the sidecar and the node, injected by a real TCP fault proxy (Toxiproxy) under a
bounded concurrent load of reranked, intercepted and passed-through searches. Whatever the fault,
every request is answered within its deadline plus a stated margin, never with a 500, never left
hanging; readiness turns false while the node cannot be reached and back once it can; searches
succeed again within a bound after the fault is removed. The fault table is printed."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sidecar.embedding import BiEncoder
from tests.integration.conftest import Cluster
from tests.integration.fault_proxy import Toxiproxy, running_toxiproxy
from tests.integration.sidecar_server import RunningSidecar, running_sidecar
from tests.integration.test_sidecar import QUERY, RERANKED

pytestmark = pytest.mark.integration

BUDGET_S = 2.0  # SIDECAR_REQUEST_TIMEOUT_S and SIDECAR_UPSTREAM_TIMEOUT_S of the sidecar under test
MARGIN_S = 3.0  # what "answered within the deadline" allows on a loaded 2-core CI machine
CLIENT_TIMEOUT_S = BUDGET_S + MARGIN_S + 10.0  # past this a request counts as unanswered
RECOVERY_S = 15.0  # searches and readiness are back within this of the fault's removal
CONCURRENCY = 4
FAULT_S = 4.0

NO_ANSWER = 0  # the client's timeout passed, or the connection broke before a status line
TRUNCATED = -1  # a status line, then the connection closed inside the body


@dataclass(frozen=True)
class Fault:
    kind: str  # "refuse", or the type of a Toxiproxy toxic on the node's answers
    attributes: dict[str, int]
    # Whether readiness must turn false while it lasts (the node's root cannot be read).
    unreachable: bool
    # Whether a pass-through may outlast the deadline: it streams for as long as bytes keep
    # coming (each read is bounded by SIDECAR_UPSTREAM_TIMEOUT_S, not the whole transfer).
    streams_slowly: bool = False


FAULTS = [
    Fault("refuse", {}, unreachable=True),  # the proxy's listener is closed: connection refused
    Fault("latency", {"latency": 4_000}, unreachable=True),  # each answer 4 s late: past budget
    Fault("reset_peer", {"timeout": 0}, unreachable=True),  # connections reset as data arrives
    Fault("limit_data", {"bytes": 1_500}, unreachable=False),  # cut after 1,500 bytes back
    Fault("bandwidth", {"rate": 4}, unreachable=False, streams_slowly=True),  # 4 KB/s back
]


@dataclass
class Outcomes:
    """What each request of the load got: its status (0: no answer) and how long it took."""

    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    slowest_s: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, status: int, elapsed_s: float) -> None:
        with self.lock:
            self.statuses[(kind, status)] += 1
            self.slowest_s[kind] = max(self.slowest_s.get(kind, 0.0), elapsed_s)


def _call(url: str, body: dict[str, object] | None) -> int:
    """The status of one request, NO_ANSWER or TRUNCATED; a complete body must be JSON."""
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=CLIENT_TIMEOUT_S) as response:
            try:
                body_read = response.read()
            except http.client.IncompleteRead:
                return TRUNCATED
            json.loads(body_read)  # a complete body that is not JSON fails the test here
            return int(response.status)
    except urllib.error.HTTPError as error:
        with error:
            json.loads(error.read())
            return error.code
    except OSError:
        return NO_ANSWER


def _requests(sidecar: RunningSidecar, index: str) -> dict[str, Callable[[], int]]:
    """One of each route the load mixes: the native reranked search, an intercepted `_search`
    with `ext.rerank`, a plain `_search` passed through, and the readiness probe."""
    return {
        "native": lambda: _call(
            f"{sidecar.url}/v1/search", {"index": index, "query": QUERY, "k": 3, "candidates": 20}
        ),
        "intercept": lambda: _call(f"{sidecar.url}/{index}/_search", RERANKED),
        "proxy": lambda: _call(
            f"{sidecar.url}/{index}/_search", {"query": {"match": {"text": "file"}}}
        ),
    }


def _ready(sidecar: RunningSidecar) -> bool:
    return _call(f"{sidecar.url}/readyz", None) == 200


def _load(sidecar: RunningSidecar, index: str, seconds: float) -> tuple[Outcomes, bool]:
    """CONCURRENCY workers cycling through the routes for `seconds`, and a readiness poller:
    (the outcomes, whether readiness was ever false meanwhile)."""
    outcomes = Outcomes()
    calls = list(_requests(sidecar, index).items())
    stop_at = time.monotonic() + seconds
    unready = threading.Event()

    def worker(offset: int) -> None:
        turn = offset
        while time.monotonic() < stop_at:
            kind, call = calls[turn % len(calls)]
            started = time.monotonic()
            outcomes.record(kind, call(), time.monotonic() - started)
            turn += 1

    def poll_readiness() -> None:
        while time.monotonic() < stop_at:
            started = time.monotonic()
            ready = _ready(sidecar)
            outcomes.record("readyz", 200 if ready else 503, time.monotonic() - started)
            if not ready:
                unready.set()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(CONCURRENCY)]
    threads.append(threading.Thread(target=poll_readiness))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes, unready.is_set()


def _recovery_s(sidecar: RunningSidecar, index: str) -> float:
    """Seconds until a reranked search and readiness both succeed again (inf past RECOVERY_S)."""
    native = _requests(sidecar, index)["native"]
    started = time.monotonic()
    while time.monotonic() - started < RECOVERY_S:
        if native() == 200 and _ready(sidecar):
            return time.monotonic() - started
    return float("inf")


@pytest.fixture(scope="module")
def toxiproxy(opensearch: Cluster) -> Iterator[Toxiproxy]:
    with running_toxiproxy(opensearch.url) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def faulted_sidecar(
    toxiproxy: Toxiproxy, encoder: BiEncoder, tiny_cross_encoder: Path
) -> Iterator[RunningSidecar]:
    with running_sidecar(
        toxiproxy.url,
        tiny_cross_encoder,
        encoder,
        request_timeout_s=BUDGET_S,
        upstream_timeout_s=BUDGET_S,
    ) as server:
        yield server


@pytest.mark.parametrize("fault", FAULTS, ids=[f.kind for f in FAULTS])
def test_every_request_is_answered_within_its_deadline_under_a_fault(
    toxiproxy: Toxiproxy,
    faulted_sidecar: RunningSidecar,
    pydoc_index: str,
    capsys: pytest.CaptureFixture[str],
    fault: Fault,
) -> None:
    assert _recovery_s(faulted_sidecar, pydoc_index) < RECOVERY_S, "healthy before the fault"
    with toxiproxy.fault(fault.kind, **fault.attributes):
        outcomes, went_unready = _load(faulted_sidecar, pydoc_index, FAULT_S)
    recovery_s = _recovery_s(faulted_sidecar, pydoc_index)
    statuses = sorted(outcomes.statuses.items())
    with capsys.disabled():
        counts = ", ".join(f"{kind} {status}: {count}" for (kind, status), count in statuses)
        slowest = ", ".join(f"{kind} {s:.2f} s" for kind, s in sorted(outcomes.slowest_s.items()))
        print(
            f"\nfault {fault.kind} {fault.attributes}: {sum(outcomes.statuses.values())} requests;"
            f" {counts}; slowest {slowest}; readiness false: {went_unready};"
            f" recovered in {recovery_s:.2f} s"
        )
    assert NO_ANSWER not in {status for (_, status), _ in statuses}, "every request is answered"
    # A cut transfer is the answer only where the status line was sent before the node broke.
    assert {kind for (kind, status), _ in statuses if status == TRUNCATED} <= {"proxy"}
    assert all(status < 500 or status in (502, 503, 504) for (_, status), _ in statuses), statuses
    for kind, slowest_s in outcomes.slowest_s.items():
        if not (kind == "proxy" and fault.streams_slowly):
            assert slowest_s <= BUDGET_S + MARGIN_S, f"{kind} answered past its deadline"
    if fault.unreachable:
        assert went_unready, "readiness turns false while the node cannot be reached"
    assert recovery_s < RECOVERY_S, "searches and readiness are back after the fault"
