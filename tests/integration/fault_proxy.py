"""Toxiproxy, a real TCP fault proxy, between the sidecar and the node: built once from its Go module
(pinned, checksums verified by the Go toolchain against sum.golang.org; go_tools.py), started on
a free port, driven over its HTTP API. Faults are Toxiproxy's own: a disabled proxy refuses
connections; toxics add latency, cut a response after some bytes, reset connections, limit bandwidth."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sidecar.processes import stop
from tests.integration.go_tools import GoTool, go_tool_binary
from tests.integration.processes import free_port

TOXIPROXY = GoTool(
    "toxiproxy",
    "github.com/Shopify/toxiproxy/v2",
    "v2.12.0",
    binary="server",
    package="cmd/server",
    override="TOXIPROXY_BIN",
)


class Toxiproxy:
    """A running Toxiproxy server and the one proxy it holds in front of `upstream` (host:port)."""

    NAME = "opensearch"

    def __init__(self, api: str, upstream: str) -> None:
        self.api = api
        created = self._call(
            "POST", "/proxies", {"name": self.NAME, "listen": "127.0.0.1:0", "upstream": upstream}
        )
        self.url = f"http://{created['listen']}"

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            self.api + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read()
        return json.loads(text) if text else None

    def set_enabled(self, enabled: bool) -> None:
        """Disabled, the proxy closes its listener and its connections: the node refuses."""
        self._call("POST", f"/proxies/{self.NAME}", {"enabled": enabled})

    def add_toxic(self, kind: str, stream: str = "downstream", **attributes: int) -> None:
        self._call(
            "POST",
            f"/proxies/{self.NAME}/toxics",
            {
                "name": kind,
                "type": kind,
                "stream": stream,
                "toxicity": 1.0,
                "attributes": attributes,
            },
        )

    def heal(self) -> None:
        """Every toxic removed and the proxy enabled again."""
        self._call("POST", "/reset")

    @contextmanager
    def fault(self, kind: str, **attributes: int) -> Iterator[None]:
        """`kind` "refuse" disables the proxy; any other is a downstream toxic of that type."""
        if kind == "refuse":
            self.set_enabled(False)
        else:
            self.add_toxic(kind, **attributes)
        try:
            yield
        finally:
            self.heal()


@contextmanager
def running_toxiproxy(upstream_url: str) -> Iterator[Toxiproxy]:
    """A Toxiproxy server on a free port with a proxy to the node at `upstream_url`."""
    port = free_port()
    server = subprocess.Popen(
        [str(go_tool_binary(TOXIPROXY)), "-host", "127.0.0.1", "-port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{port}"
    try:
        _wait_for_api(api, server)
        yield Toxiproxy(api, upstream_url.removeprefix("http://").rstrip("/"))
    finally:
        stop(server, 30)


def _wait_for_api(api: str, server: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """Until the API answers /version (the server has bound its port), or the server exits."""
    give_up = time.monotonic() + timeout_s
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"toxiproxy exited with {server.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{api}/version", timeout=2):
                return
        except OSError:
            if time.monotonic() > give_up:
                raise
        time.sleep(0.05)  # polling a port that is not bound yet: nothing to wait on but time
