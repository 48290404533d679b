"""The image we ship, built and run here: deploy/Dockerfile built on a Debian base made locally (the
same BASE_IMAGE argument users override), run with the project's own testcontainers module against
the real node on the host, searched through; SIGTERM under load drains it within its grace period.
Build time, image size and start-to-ready time are printed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from sidecar.testing import SidecarContainer
from tests.integration.conftest import Cluster
from tests.integration.docker_engine import DockerEngine, docker_engine, local_base_image
from tests.integration.processes import free_port
from tests.integration.test_listener import (
    IN_FLIGHT_AT_SIGNAL,
    LOAD_THREADS,
    SearchLoad,
    wait_for,
)
from tests.integration.test_sidecar import QUERY, post

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
IMAGE = "opensearch-rerank-sidecar:test"
GRACE_S = 20
READY_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def engine() -> Iterator[DockerEngine]:
    with docker_engine() as running, pytest.MonkeyPatch.context() as patch:
        # testcontainers' own client: this engine, and no reaper container (it cannot be pulled).
        patch.setenv("DOCKER_HOST", running.host)
        patch.setenv("TESTCONTAINERS_RYUK_DISABLED", "true")
        yield running


@pytest.fixture(scope="module")
def image(engine: DockerEngine, pytestconfig: pytest.Config) -> str:
    """The shipped Dockerfile, built as a user would, with a local base image; pip reaches PyPI
    through this host's TLS-intercepting proxy with its CA given as a build secret."""
    base = local_base_image(engine)
    ca_bundle = os.environ.get("PIP_CERT") or os.environ.get("REQUESTS_CA_BUNDLE")
    secret = ["--secret", f"id=pip_ca,src={ca_bundle}"] if ca_bundle else []
    started = time.monotonic()
    engine.run(
        "build",
        "--file",
        "deploy/Dockerfile",
        "--build-arg",
        f"BASE_IMAGE={base}",
        *secret,
        "--tag",
        IMAGE,
        ".",
        cwd=REPO,
    )
    built_s = time.monotonic() - started
    engine.run("image", "prune", "--force")  # the image this tag had before: its layers go
    size = int(engine.run("image", "inspect", "--format", "{{.Size}}", IMAGE))
    # What capsys.disabled() does, for a module-scoped fixture (capsys is per test).
    with pytestconfig.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print(f"\nimage {IMAGE} on {base}: built in {built_s:.0f} s, {size / 1e9:.2f} GB")
    return IMAGE


@pytest.fixture(scope="module")
def mounted_model(tiny_cross_encoder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test cross-encoder where the container's user (uid 10001) may read it: pytest's
    temporary folders are private to root."""
    model = shutil.copytree(tiny_cross_encoder, tmp_path_factory.mktemp("mounted") / "reranker")
    for folder in (model, *(path for path in model.rglob("*") if path.is_dir())):
        folder.chmod(0o755)
    for file in model.rglob("*"):
        if file.is_file():
            file.chmod(0o644)
    return model


def sidecar_container(image: str, cluster: Cluster, model: Path, port: int) -> SidecarContainer:
    """The image on the host's network (the node listens on the host's loopback only)."""
    return SidecarContainer(
        image,
        cluster.url,
        port=port,
        reranker_model=model,
        startup_timeout_s=READY_TIMEOUT_S,
        network_mode="host",
    ).with_settings(
        reranker_dtype="float32",
        reranker_max_length=128,
        request_timeout_s=120,
        shutdown_grace_s=GRACE_S,
    )


def test_the_image_serves_searches_as_a_non_root_user(
    image: str,
    engine: DockerEngine,
    opensearch: Cluster,
    mounted_model: Path,
    pydoc_index: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    started = time.monotonic()
    with sidecar_container(image, opensearch, mounted_model, free_port()) as sidecar:
        ready_s = time.monotonic() - started
        url = sidecar.get_url()
        status, answer, _ = post(
            f"{url}/v1/search", {"index": pydoc_index, "query": QUERY, "k": 3, "candidates": 10}
        )
        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
            metrics = response.read().decode()
        container = sidecar.get_wrapped_container()
        user = container.exec_run(["id", "-u"]).output.decode().strip()
        health = engine.run("inspect", "--format", "{{json .State.Health}}", container.id)
    with capsys.disabled():
        print(f"\ncontainer start to /readyz 200: {ready_s:.1f} s")
    assert status == 200, answer
    assert answer["rerank"]["applied"] is True
    assert answer["rerank"]["model"] == "reranker", "the mounted model, named by its folder only"
    assert 'sidecar_requests_total{route="search",status="200"} 1.0' in metrics
    assert user == "10001"
    assert json.loads(health)["Status"] in ("starting", "healthy")


def test_sigterm_drains_the_container_within_its_grace_period(
    image: str, opensearch: Cluster, mounted_model: Path, pydoc_index: str
) -> None:
    port = free_port()
    with sidecar_container(image, opensearch, mounted_model, port) as sidecar:
        container = sidecar.get_wrapped_container()
        load = SearchLoad(port, pydoc_index)
        load.start()
        wait_for(lambda: load.snapshot()[0] >= LOAD_THREADS, "the first searches", 180)
        wait_for(lambda: load.snapshot()[1] >= IN_FLIGHT_AT_SIGNAL, "searches in flight", 60)
        signal_at = time.monotonic()
        load.signalled.set()
        container.kill(signal=signal.SIGTERM.name)
        # Readiness is false at once: the listener is closed before anything is drained.
        wait_for(lambda: not _accepts(port), "the listener closed after SIGTERM", 5)
        exit_code = container.wait(timeout=GRACE_S + 30)["StatusCode"]
        stopped_s = time.monotonic() - signal_at
        load.join()
    assert exit_code == 0
    assert stopped_s < GRACE_S + 10
    in_flight = [o for o in load.outcomes if o.sent_at < signal_at]
    failed = [o for o in in_flight if o.status != 200 or o.error is not None]
    assert not failed, f"{len(failed)} of {len(in_flight)} requests in flight got no 200: {failed}"


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_the_compose_file_is_valid_and_wires_the_stack() -> None:
    """`docker-compose config` (Debian's docker-compose) validates the file and resolves it."""
    compose = os.environ.get("DOCKER_COMPOSE_BIN") or shutil.which("docker-compose")
    assert compose is not None, "docker-compose is missing: run `make docker-bin`"
    resolved = subprocess.run(
        [compose, "--file", str(REPO / "deploy" / "compose.yaml"), "config"],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "COMPOSE_PROJECT_NAME": "validate"},
    )
    services = yaml.safe_load(resolved.stdout)["services"]
    assert set(services) == {"opensearch", "sidecar", "prometheus", "grafana"}
    sidecar = services["sidecar"]
    assert Path(sidecar["build"]["context"]) == REPO
    assert sidecar["build"]["dockerfile"] == "deploy/Dockerfile"
    assert sidecar["environment"]["SIDECAR_OPENSEARCH_URL"] == "http://opensearch:9200"
    assert sidecar["depends_on"]["opensearch"]["condition"] == "service_healthy"
    scrape = yaml.safe_load((REPO / "deploy" / "compose" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["sidecar:8080"]
    mounts = {volume.split(":")[1] for volume in services["grafana"]["volumes"]}
    assert {"/etc/grafana/provisioning", "/var/lib/grafana/dashboards"} <= mounts
    published = [port for service in services.values() for port in service.get("ports", [])]
    assert len(published) == 4
    assert all(port.startswith("127.0.0.1:") for port in published), "nothing on all interfaces"
