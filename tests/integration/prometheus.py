"""A real Prometheus server for the integration tests: it scrapes the sidecar's /metrics the way a
deployment does and evaluates PromQL with the real engine, so metric names, labels and the
dashboards' expressions are checked against Prometheus itself rather than against our reading of it."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from sidecar.processes import stop
from tests.integration.processes import find_binary, free_port

INSTALL_HINT = (
    "install the Debian/Ubuntu package 'prometheus' (`make prometheus-bin` does it as root, or "
    "`apt-get install prometheus`), or set PROMETHEUS_BIN to a prometheus 2.x binary"
)
READY_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.2
HTTP_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_BYTES = 4000
JOB_NAME = "sidecar"


class PrometheusError(RuntimeError):
    """Prometheus is missing, did not become ready, rejected a query, or never scraped a target."""


def find_prometheus(environ: Mapping[str, str] = os.environ) -> Path:
    """PROMETHEUS_BIN, else `prometheus` on PATH, else Debian's. Raises PrometheusError."""
    return find_binary("PROMETHEUS_BIN", "prometheus", INSTALL_HINT, PrometheusError, environ)


def _duration(seconds: float) -> str:
    """A Prometheus duration string; milliseconds keep sub-second intervals exact."""
    return f"{max(1, round(seconds * 1000))}ms"


def _parse_time(text: str) -> float:
    """Unix seconds from Prometheus's RFC 3339 timestamps (nanosecond fractions are truncated)."""
    return datetime.fromisoformat(text).timestamp()


class RunningPrometheus:
    """One Prometheus process on a free 127.0.0.1 port, scraping `targets` (host:port, path
    /metrics) as job "sidecar", with its config, TSDB and log under `workdir`.

    The constructor returns once /-/ready answers, and raises PrometheusError (with the log's tail)
    when it does not within READY_TIMEOUT_S. Use as a context manager or call stop().
    """

    def __init__(
        self,
        binary: Path,
        workdir: Path,
        targets: list[str],
        scrape_interval_s: float = 1.0,
    ) -> None:
        self.workdir = workdir
        self.scrape_interval_s = scrape_interval_s
        self.log_path = workdir / "prometheus.log"
        workdir.mkdir(parents=True, exist_ok=True)
        config_path = workdir / "prometheus.yml"
        config_path.write_text(json.dumps(self._config(targets, scrape_interval_s), indent=2))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        command = [
            str(binary),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        with self.log_path.open("wb") as log:
            # cwd=workdir: relative paths Prometheus may resolve (console templates in upstream
            # builds) then point into the test's own directory, never the checkout.
            process = subprocess.Popen(
                command, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self._process: subprocess.Popen[bytes] | None = process
        try:
            self._wait_until_ready(process)
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _config(targets: list[str], scrape_interval_s: float) -> dict[str, Any]:
        """The prometheus.yml content (JSON is YAML, so no YAML library is needed). The scrape
        timeout is the interval: the 10 s default would exceed a short interval, which is invalid."""
        interval = _duration(scrape_interval_s)
        return {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "scrape_configs": [
                {
                    "job_name": JOB_NAME,
                    "metrics_path": "/metrics",
                    "static_configs": [{"targets": targets}],
                }
            ],
        }

    def __enter__(self) -> RunningPrometheus:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - LOG_TAIL_BYTES))
                return log.read().decode(errors="replace")
        except OSError as error:
            return f"(log unreadable: {error})"

    def _wait_until_ready(self, process: subprocess.Popen[bytes]) -> None:
        """Poll /-/ready until it answers 200; fail at once if the process exits (bad flag, port
        taken) instead of waiting out the deadline."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            status = process.poll()
            if status is not None:
                raise PrometheusError(
                    f"Prometheus exited with status {status} while starting; log tail:\n"
                    + self._log_tail()
                )
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or 503 while the TSDB opens
            if time.monotonic() >= deadline:
                raise PrometheusError(
                    f"Prometheus at {self.url} was not ready within {READY_TIMEOUT_S:.0f} s; "
                    "log tail:\n" + self._log_tail()
                )
            time.sleep(POLL_INTERVAL_S)

    def _get(self, path: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        """GET an API path and return its "data". Prometheus answers errors (400 bad_data, 422
        execution) with a JSON body too, so the body is read either way and its message raised."""
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            with error:
                body = error.read()
        except urllib.error.URLError as error:
            raise PrometheusError(f"GET {url} failed: {error.reason}") from error
        try:
            answer = json.loads(body)
        except json.JSONDecodeError as error:
            raise PrometheusError(f"GET {url} did not return JSON: {body[:200]!r}") from error
        if answer.get("status") != "success":
            raise PrometheusError(
                f"Prometheus rejected GET {path} {dict(params or {})}: "
                f"{answer.get('errorType')}: {answer.get('error')}"
            )
        data: dict[str, Any] = answer["data"]
        return data

    def query(self, expr: str) -> dict[str, Any]:
        """Evaluate an instant PromQL query now; returns the "data" object (`resultType`,
        `result`). Raises PrometheusError with Prometheus's message (e.g. a parse error)."""
        return self._get("/api/v1/query", {"query": expr})

    def wait_for_scrape(self, timeout_s: float = 60.0) -> None:
        """Wait until every target has been scraped successfully by a scrape that began after this
        call, and that scrape's samples are queryable.

        A target reports its last scrape just before the scrape's samples are committed, so the
        `up` sample of that scrape is waited for too; otherwise a query straight after could still
        see the previous scrape. Raises PrometheusError with each target's state and last error on
        timeout. Prometheus hands static targets to the scraper only every 5 s, so the first call
        after start takes that long.
        """
        called_at = time.time()
        deadline = time.monotonic() + timeout_s
        while True:
            targets = [
                target
                for target in self._get("/api/v1/targets", {"state": "active"})["activeTargets"]
                if target["labels"].get("job") == JOB_NAME
            ]
            if targets and self._scraped_since(targets, called_at):
                return
            if time.monotonic() >= deadline:
                states = "; ".join(
                    f"{target['scrapeUrl']}: health={target['health']} "
                    f"lastScrape={target['lastScrape']} lastError={target['lastError']!r}"
                    for target in targets
                )
                raise PrometheusError(
                    f"no successful scrape after {timeout_s:.0f} s: {states or 'no targets yet'}"
                )
            time.sleep(POLL_INTERVAL_S)

    def _scraped_since(self, targets: list[dict[str, Any]], since: float) -> bool:
        scraped_at: dict[str, float] = {}
        for target in targets:
            last_scrape = _parse_time(target["lastScrape"])
            if target["health"] != "up" or last_scrape <= since:
                return False
            scraped_at[target["labels"]["instance"]] = last_scrape
        committed = {
            sample["metric"]["instance"]: float(sample["value"][1])
            for sample in self.query(f'timestamp(up{{job="{JOB_NAME}"}})')["result"]
        }
        # The scrape's `up` is stamped with its scheduled time, within milliseconds of lastScrape;
        # half an interval tells it apart from the previous scrape's.
        margin_s = self.scrape_interval_s / 2
        return all(
            committed.get(instance, 0.0) >= last_scrape - margin_s
            for instance, last_scrape in scraped_at.items()
        )

    def stop(self) -> None:
        """Terminate Prometheus (SIGTERM lets it close the TSDB), kill it if it does not exit in
        STOP_TIMEOUT_S, and reap it. Idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        stop(process, STOP_TIMEOUT_S)
