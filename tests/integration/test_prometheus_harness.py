"""The Prometheus harness against the real binary, scraping a fixed exposition served by a tiny
standard-library HTTP server, so metric tests can rely on what the harness reports."""

from __future__ import annotations

import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.integration.prometheus import PrometheusError, RunningPrometheus, find_prometheus

pytestmark = pytest.mark.integration

EXPOSITION = b"""\
# HELP demo_requests_total Requests served.
# TYPE demo_requests_total counter
demo_requests_total{route="a"} 3
"""


class _MetricsHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path != "/metrics":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(EXPOSITION)))
        self.end_headers()
        self.wfile.write(EXPOSITION)

    def log_message(self, format: str, *args: object) -> None:
        """Silent: a line per scrape would bury the test output."""


@pytest.fixture(scope="module")
def metrics_target() -> Iterator[str]:
    """host:port of a server exposing EXPOSITION at /metrics."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _MetricsHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"{host!s}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def prometheus(
    metrics_target: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningPrometheus]:
    workdir = tmp_path_factory.mktemp("prometheus")
    with RunningPrometheus(find_prometheus(), workdir, [metrics_target]) as running:
        running.wait_for_scrape()
        yield running


def test_wait_for_scrape_sees_the_target_up(prometheus: RunningPrometheus) -> None:
    prometheus.wait_for_scrape()

    [sample] = prometheus.query('up{job="sidecar"}')["result"]
    assert sample["value"][1] == "1"


def test_query_returns_the_scraped_counter_with_its_labels(prometheus: RunningPrometheus) -> None:
    data = prometheus.query("demo_requests_total")

    assert data["resultType"] == "vector"
    [sample] = data["result"]
    assert sample["metric"]["route"] == "a"
    assert sample["metric"]["job"] == "sidecar"
    assert float(sample["value"][1]) == 3.0


def test_query_evaluates_range_functions(prometheus: RunningPrometheus) -> None:
    data = prometheus.query("sum(rate(demo_requests_total[1m]))")

    assert data["resultType"] == "vector"


def test_invalid_expression_raises_with_the_parse_error(prometheus: RunningPrometheus) -> None:
    with pytest.raises(PrometheusError, match="parse error"):
        prometheus.query("sum(rate(demo_requests_total[1m])")


def test_stop_is_idempotent_and_frees_the_port(metrics_target: str, tmp_path: Path) -> None:
    running = RunningPrometheus(find_prometheus(), tmp_path, [metrics_target])

    running.stop()
    running.stop()

    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{running.url}/-/ready", timeout=5)


def test_start_failure_raises_instead_of_hanging(tmp_path: Path) -> None:
    exits_at_once = shutil.which("false")
    assert exits_at_once is not None

    with pytest.raises(PrometheusError, match="exited with status 1"):
        RunningPrometheus(Path(exits_at_once), tmp_path, [])


def test_find_prometheus_rejects_a_missing_explicit_binary(tmp_path: Path) -> None:
    with pytest.raises(PrometheusError, match="install the Debian/Ubuntu package 'prometheus'"):
        find_prometheus({"PROMETHEUS_BIN": str(tmp_path / "absent"), "PATH": ""})
