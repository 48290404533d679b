"""A Docker engine for the container tests: the one DOCKER_HOST names if it answers; else the tests'
own `dockerd` (Debian's docker.io, installed by `make docker-bin`) on a socket and data root of
their own, started here and stopped afterwards. There is no image registry to pull from: the base
image the Dockerfile is built on is made locally with debootstrap and `docker import`, once."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sidecar.processes import stop

log = logging.getLogger(__name__)

OWN_ROOT = Path("/var/lib/opensearch-sidecar/docker")  # images and build cache kept between runs
OWN_SOCKET = Path("/run/opensearch-sidecar-docker.sock")
LOCAL_BASE_IMAGE = "opensearch-sidecar-base/debian:bookworm"
_START_TIMEOUT_S = 120.0


class DockerFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class DockerEngine:
    host: str  # a DOCKER_HOST value
    cli: str  # a docker client that builds with BuildKit (secrets, cache mounts)

    def run(self, *args: str, timeout_s: float = 1800, **kwargs: object) -> str:
        """`docker ARGS` against this engine; its stdout. Raises DockerFailed with the end of
        what docker printed on stderr (a build's failing step)."""
        done = subprocess.run(
            [self.cli, *args],
            env={**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "1"},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            **kwargs,  # type: ignore[call-overload]
        )
        if done.returncode != 0:
            raise DockerFailed(f"docker {' '.join(args)}:\n{done.stderr[-4000:]}")
        return str(done.stdout)

    def has_image(self, name: str) -> bool:
        try:
            self.run("image", "inspect", name, timeout_s=60)
        except DockerFailed:
            return False
        return True


def _answers(host: str) -> bool:
    """Whether the engine at `host` (unix:// only) answers /_ping."""
    if not host.startswith("unix://"):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(5)
            connection.connect(host.removeprefix("unix://"))
            connection.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            return b"200 OK" in connection.recv(1024)
    except OSError:
        return False


def _buildkit_cli() -> str:
    """A client that builds with BuildKit: DOCKER_CLI if set; else one with the buildx plugin;
    else Debian's own 20.10 client (its `DOCKER_BUILDKIT=1 docker build` needs no plugin, where
    a newer client without buildx falls back to the legacy builder, which has no `--mount`)."""
    if given := os.environ.get("DOCKER_CLI"):
        return given
    for candidate in (shutil.which("docker"), "/usr/bin/docker"):
        if candidate is None or not Path(candidate).exists():
            continue
        if subprocess.run([candidate, "buildx", "version"], capture_output=True).returncode == 0:
            return candidate
    if Path("/usr/bin/docker").exists():
        return "/usr/bin/docker"
    raise RuntimeError(
        "the container tests need a docker client with BuildKit: run `make docker-bin` (Debian's "
        "docker.io), install the buildx plugin, or set DOCKER_CLI"
    )


@contextmanager
def docker_engine() -> Iterator[DockerEngine]:
    """The engine of DOCKER_HOST when it answers, else our own dockerd for the block."""
    given = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    for running in (given, f"unix://{OWN_SOCKET}"):  # ours, when left running by hand
        if _answers(running):
            yield DockerEngine(running, _buildkit_cli())
            return
    dockerd = os.environ.get("DOCKERD_BIN") or shutil.which("dockerd") or "/usr/sbin/dockerd"
    if not Path(dockerd).exists():
        raise RuntimeError(
            "the container tests need a Docker engine: none answers at DOCKER_HOST and dockerd is "
            "not installed (run `make docker-bin`, which installs Debian's docker.io as root)"
        )
    host = f"unix://{OWN_SOCKET}"
    OWN_ROOT.mkdir(parents=True, exist_ok=True)
    log_file = OWN_ROOT / "dockerd.log"
    with log_file.open("ab") as output:
        daemon = subprocess.Popen(
            [
                dockerd,
                f"--host={host}",
                f"--data-root={OWN_ROOT / 'data'}",
                f"--exec-root={OWN_ROOT / 'exec'}",
                f"--pidfile={OWN_ROOT / 'dockerd.pid'}",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        give_up = time.monotonic() + _START_TIMEOUT_S
        while not _answers(host):
            if daemon.poll() is not None or time.monotonic() > give_up:
                raise RuntimeError(f"dockerd did not start; its log: {log_file}")
            time.sleep(0.2)  # the socket is not there yet: nothing to wait on but time
        yield DockerEngine(host, _buildkit_cli())
    finally:
        stop(daemon, 60)


def local_base_image(engine: DockerEngine) -> str:
    """A Debian bookworm base image made here (no registry to pull one from): debootstrap's
    minbase, imported once and kept in the engine."""
    if engine.has_image(LOCAL_BASE_IMAGE):
        return LOCAL_BASE_IMAGE
    debootstrap = (
        os.environ.get("DEBOOTSTRAP_BIN") or shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    )
    if not Path(debootstrap).exists():
        raise RuntimeError("making the base image needs debootstrap: run `make docker-bin`")
    log.warning("making %s with debootstrap (once)", LOCAL_BASE_IMAGE)
    with tempfile.TemporaryDirectory(prefix="debootstrap-") as root:
        subprocess.run(
            [debootstrap, "--variant=minbase", "bookworm", root], check=True, timeout=1200
        )
        with subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE) as tar:
            engine.run("import", "-", LOCAL_BASE_IMAGE, stdin=tar.stdout, timeout_s=600)
        if tar.returncode != 0:
            raise RuntimeError("tar of the debootstrap root failed")
    return LOCAL_BASE_IMAGE
