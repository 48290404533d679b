"""A testcontainers module for applications that test against the sidecar: `SidecarContainer` runs
the sidecar's image next to an OpenSearch the test already has, and is ready when `/readyz` is
(models loaded and warmed, the cluster answering). Needs the `testing` extra.

    with SidecarContainer(opensearch_url="http://opensearch:9200").with_network(network) as sidecar:
        OpenSearch(hosts=[sidecar.get_url()]).search(index="docs", body=...)
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Self

from testcontainers.core.container import DockerContainer
from testcontainers.core.exceptions import ContainerStartException
from testcontainers.core.waiting_utils import WaitStrategy, WaitStrategyTarget

DEFAULT_IMAGE = "opensearch-rerank-sidecar:latest"
MODEL_MOUNT = "/models/reranker"


class SidecarContainer(DockerContainer):
    """The sidecar in a container, configured only through `SIDECAR_*` variables, as in production.

    `reranker_model`: a Hub id, or a local cross-encoder directory (mounted read-only). With
    `network_mode="host"` (a cluster on the host's loopback) the sidecar listens on `port` of the
    host itself. `startup_timeout_s` covers model loading and warm-up."""

    def __init__(
        self,
        image: str = DEFAULT_IMAGE,
        opensearch_url: str = "http://opensearch:9200",
        *,
        port: int = 8080,
        reranker_model: str | Path | None = None,
        startup_timeout_s: float = 300.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(image, **kwargs)
        self.port = port
        self._host_network = kwargs.get("network_mode") == "host"
        if not self._host_network:
            self.with_exposed_ports(port)
        self.with_settings(opensearch_url=opensearch_url, listen_port=port)
        if isinstance(reranker_model, Path) or (
            reranker_model is not None and os.path.isdir(reranker_model)
        ):
            self.with_volume_mapping(Path(reranker_model).resolve(), MODEL_MOUNT, "ro")
            self.with_settings(reranker_model=MODEL_MOUNT)
        elif reranker_model is not None:
            self.with_settings(reranker_model=reranker_model)
        self.waiting_for(_ReadyUnlessExited(port).with_startup_timeout(int(startup_timeout_s)))

    def with_settings(self, **settings: object) -> Self:
        """`with_settings(request_timeout_s=5)` sets SIDECAR_REQUEST_TIMEOUT_S=5."""
        for name, value in settings.items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            self.with_env(f"SIDECAR_{name.upper()}", text)
        return self

    def get_container_host_ip(self) -> str:
        return "127.0.0.1" if self._host_network else super().get_container_host_ip()

    def get_exposed_port(self, port: int) -> int:
        return port if self._host_network else super().get_exposed_port(port)

    def get_url(self) -> str:
        """The sidecar's base URL, as the test process reaches it."""
        return f"http://{self.get_container_host_ip()}:{self.get_exposed_port(self.port)}"


class _ReadyUnlessExited(WaitStrategy):
    """Until `/readyz` answers 200; at once, with the container's log, if the sidecar exits
    first (a bad setting or an unloadable model stops it before it ever listens)."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self._port = port

    def wait_until_ready(self, container: WaitStrategyTarget) -> None:
        give_up = time.monotonic() + self._startup_timeout
        url = (
            f"http://{container.get_container_host_ip()}:"
            f"{container.get_exposed_port(self._port)}/readyz"
        )
        while True:
            wrapped = container.get_wrapped_container()
            wrapped.reload()
            if wrapped.status in ("exited", "dead"):
                log = wrapped.logs().decode(errors="replace")
                raise ContainerStartException(f"the sidecar exited before it was ready:\n{log}")
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    if answer.status == 200:
                        return
            except urllib.error.HTTPError as not_ready:  # 503 until the cluster answers
                not_ready.close()
            except OSError:
                pass  # not listening yet: the models load first
            if time.monotonic() > give_up:
                raise TimeoutError(f"{url} not 200 within {self._startup_timeout:g} s")
            time.sleep(self._poll_interval)
