"""Running the real sidecar app on a real port, in a background thread, for integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from sidecar.api.listener import ListenerOptions, ListenerRunner, listener_options, listener_tls
from sidecar.app import create_app
from sidecar.config import Settings
from sidecar.embedding import BiEncoder
from sidecar.rerank.backend import RerankBackend


class RunningSidecar:
    """The app served on 127.0.0.1:<free port> from its own event loop thread, by the runner that
    `sidecar serve` uses."""

    def __init__(
        self,
        app: web.Application,
        tls: ssl.SSLContext | None = None,
        options: ListenerOptions | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._runner = (
            ListenerRunner(app, access_log=None)
            if options is None
            else ListenerRunner(app, access_log=None, **options)
        )
        try:
            self._loop.run_until_complete(self._runner.setup())
        except BaseException:
            self._loop.close()
            raise
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=tls)
        self._loop.run_until_complete(site.start())
        host, port = self._runner.addresses[0][:2]
        self.url = f"{'https' if tls else 'http'}://{host}:{port}"
        self.app = app
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coroutine: Any) -> Any:
        """Run a coroutine on the server's loop (e.g. to inspect its services) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=60)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=60)
        self._loop.close()


def sidecar_settings(opensearch_url: str, model: Path, **overrides: Any) -> Settings:
    """Settings for a test sidecar: the small offline cross-encoder on torch in float32 (exact
    comparisons; the other runtimes have tests of their own), short pairs, a generous deadline
    unless a test sets one, small limits for the bad-input tests, cache figures reported."""
    values: dict[str, Any] = {
        "opensearch_url": opensearch_url,
        "reranker_model": str(model),
        "reranker_dtype": "float32",
        "reranker_backend": "torch",
        "reranker_max_length": 128,
        "request_timeout_s": 120.0,
        "max_candidates": 200,
        "max_body_bytes": 64 * 1024,
        # The tests read cache hits and pairs scored; a sidecar reports them only when asked.
        "report_cache_stats": True,
    }
    return Settings(**(values | overrides))


@contextlib.contextmanager
def running_sidecar(
    opensearch_url: str,
    model: Path,
    encoder: BiEncoder,
    *,
    backend: RerankBackend | None = None,
    **overrides: Any,
) -> Iterator[RunningSidecar]:
    """A sidecar app on a free port for the duration of the block, on HTTPS when the settings
    give the listener a certificate (as `sidecar serve` would)."""
    settings = sidecar_settings(opensearch_url, model, **overrides)
    server = RunningSidecar(
        create_app(settings, backend=backend, encoder=encoder),
        listener_tls(settings),
        listener_options(settings),
    )
    try:
        yield server
    finally:
        server.stop()


def metric_total(server: RunningSidecar, series: str) -> float:
    """The sum of a metric's samples on the server's /metrics: `series` is a name (every label
    set summed) or a name with its labels, as exposed."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as response:
        lines = response.read().decode().splitlines()
    return sum(
        float(line.split()[-1])
        for line in lines
        if line.split(" ")[0] == series or line.startswith(series + "{")
    )
