"""The listener of a real sidecar: requests its HTTP parser refuses, and `sidecar serve` stopped by
SIGTERM while under load."""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import ENV_PREFIX
from tests.integration.conftest import Cluster
from tests.integration.processes import free_port
from tests.integration.sidecar_server import RunningSidecar
from tests.unit.api.test_listener import MALFORMED, MARKER, assert_opensearch_error, exchange

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
QUERY = "how do I make sure cleanup code runs even when an error is raised"
LOAD_THREADS = 8
# Requests in flight at once before the signal is sent (of LOAD_THREADS).
IN_FLIGHT_AT_SIGNAL = 4
# Model loading, and the first searches, on a small CPU box with the rest of the suite beside it.
READY_DEADLINE_S = 300.0
WARM_DEADLINE_S = 180.0
# The drain is bounded by aiohttp's 60 s shutdown timeout; a process still running past this hangs.
EXIT_DEADLINE_S = 90.0
REQUEST_TIMEOUT_S = 120.0


def test_a_real_sidecar_answers_what_its_parser_refuses_in_opensearch_error_shape(
    tiny_sidecar: RunningSidecar,
) -> None:
    port = int(tiny_sidecar.url.rsplit(":", 1)[1])
    for raw in MALFORMED.values():
        answer = asyncio.run(exchange(port, raw))
        assert_opensearch_error(answer, 400, "illegal_argument_exception")
        assert MARKER not in answer.body


@dataclass
class Outcome:
    """One search of the load: sent (its last byte written) at `sent_at`, answered or failed at
    `ended_at` (monotonic seconds)."""

    sent_at: float
    ended_at: float | None = None
    status: int | None = None
    answer: dict[str, Any] | None = None
    connection_close: bool = False
    error: str | None = None


class SearchLoad:
    """Threads doing reranked /v1/search back to back, each on its own keep-alive connection,
    each with queries of its own (so that the score cache does not answer for the model), until
    the listener refuses them."""

    def __init__(self, port: int, index: str) -> None:
        self.port = port
        self.index = index
        self.outcomes: list[Outcome] = []
        self.refused_before_signal: list[str] = []
        self.signalled = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._search_until_refused, args=(n,), daemon=True)
            for n in range(LOAD_THREADS)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=REQUEST_TIMEOUT_S)
        assert not any(thread.is_alive() for thread in self._threads), "a search hung"

    def snapshot(self) -> tuple[int, int]:
        """(answered, in flight) now."""
        with self._lock:
            answered = sum(o.ended_at is not None for o in self.outcomes)
            return answered, len(self.outcomes) - answered

    def _search_until_refused(self, thread: int) -> None:
        # http.client opens a new connection when the server closed the last one.
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT_S)
        try:
            for n in itertools.count():
                body = {
                    "index": self.index,
                    "query": f"{QUERY} {thread}-{n}",
                    "k": 5,
                    "candidates": 20,
                }
                try:
                    connection.request(
                        "POST", "/v1/search", json.dumps(body), {"Content-Type": "application/json"}
                    )
                except OSError as error:
                    if not self.signalled.is_set():
                        self.refused_before_signal.append(repr(error))
                    return
                outcome = Outcome(sent_at=time.monotonic())
                with self._lock:
                    self.outcomes.append(outcome)
                try:
                    response = connection.getresponse()
                    outcome.status = response.status
                    outcome.connection_close = response.getheader("Connection") == "close"
                    outcome.answer = json.loads(response.read())
                except (OSError, http.client.HTTPException, ValueError) as error:
                    outcome.error = repr(error)
                    connection.close()
                outcome.ended_at = time.monotonic()
        finally:
            connection.close()


def wait_until_ready(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + READY_DEADLINE_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"sidecar serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as ready:
                if ready.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet: the models load before the listener opens
        time.sleep(0.5)
    pytest.fail(f"not ready within {READY_DEADLINE_S} s:\n{log.read_text()}")


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s} s")
        time.sleep(0.01)


@dataclass(frozen=True)
class Served:
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log: Path


@pytest.fixture
def served(opensearch: Cluster, tiny_cross_encoder: Path, tmp_path: Path) -> Iterator[Served]:
    """`sidecar serve` as an operator runs it, configured like the in-process test sidecars,
    with /metrics on a port of its own."""
    port, metrics_port = free_port(), free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)} | {
        "SIDECAR_METRICS_PORT": str(metrics_port),
        "SIDECAR_OPENSEARCH_URL": opensearch.url,
        "SIDECAR_RERANKER_MODEL": str(tiny_cross_encoder),
        "SIDECAR_RERANKER_DTYPE": "float32",
        "SIDECAR_RERANKER_MAX_LENGTH": "128",
        "SIDECAR_REQUEST_TIMEOUT_S": "120",
        # The default runtime (auto: OpenVINO on a CPU without AMX) exports the model here.
        "SIDECAR_CACHE_DIR": str(tmp_path / "cache"),
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "serve", "--listen-port", str(port)],
            cwd=REPO,
            env=environ,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        yield Served(process, port, metrics_port, log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_metrics_on_their_own_port_are_not_on_the_main_one(served: Served) -> None:
    wait_until_ready(served.process, f"http://127.0.0.1:{served.port}", served.log)
    with urllib.request.urlopen(f"http://127.0.0.1:{served.metrics_port}/metrics") as scraped:
        assert scraped.status == 200
        assert "sidecar_requests_total" in scraped.read().decode()
    # On the main port /metrics is no path of the sidecar's: the cluster's own answer for it.
    with pytest.raises(urllib.error.HTTPError) as main:
        urllib.request.urlopen(f"http://127.0.0.1:{served.port}/metrics")
    assert main.value.code in (400, 404)
    assert b"sidecar_" not in main.value.read()


def test_sigterm_under_load_finishes_every_request_in_flight_and_exits_cleanly(
    served: Served, pydoc_index: str
) -> None:
    process, port, log = served.process, served.port, served.log
    wait_until_ready(process, f"http://127.0.0.1:{port}", log)
    load = SearchLoad(port, pydoc_index)
    load.start()
    wait_for(lambda: load.snapshot()[0] >= LOAD_THREADS, "the first searches", WARM_DEADLINE_S)
    wait_for(lambda: load.snapshot()[1] >= IN_FLIGHT_AT_SIGNAL, "searches in flight together", 60)
    signal_at = time.monotonic()
    load.signalled.set()
    process.send_signal(signal.SIGTERM)
    exit_code = process.wait(timeout=EXIT_DEADLINE_S)
    load.join()

    assert exit_code == 0, log.read_text()
    in_flight = [
        o
        for o in load.outcomes
        if o.sent_at < signal_at and (o.ended_at is None or o.ended_at >= signal_at)
    ]
    assert in_flight, "the signal came between requests, not during them"
    failed = [o for o in in_flight if o.status != 200 or o.error is not None]
    assert not failed, f"{len(failed)} of {len(in_flight)} requests in flight got no 200: {failed}"
    assert all(o.answer is not None and o.answer["rerank"]["applied"] for o in in_flight)
    assert not [o for o in load.outcomes if o.sent_at < signal_at and o.error is not None]
    assert not load.refused_before_signal
    # Those answered while draining (nearly all: a search takes far longer than the signal to
    # arrive) tell their client that the connection closes.
    assert any(o.connection_close for o in in_flight)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    messages = [json.loads(line)["msg"] for line in log.read_text().splitlines() if line[:1] == "{"]
    assert f"serving on http://127.0.0.1:{port}" in messages
    shutdown = messages.index(
        "shutting down on SIGTERM: the listener closes, requests in flight finish first"
    )
    assert "stopped: requests drained, services closed" in messages[shutdown:]
