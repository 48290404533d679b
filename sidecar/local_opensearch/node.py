"""A single-node OpenSearch with the k-NN and neural-search plugins, installed and run by the project.

Layout under the node's home (one per HTTP port): `opensearch-<version>/` (install),
`data/`, `logs/`, `tmp/`, `opensearch.pid` and `node.json` (what was installed). OpenSearch
refuses to run as root, so when we are root the node runs as the system user `opensearch-sidecar`.

The secured variant (`secure`) runs the security plugin's release instead, on HTTPS with the
plugin's demo certificates; its generated admin password is in `admin-password` (mode 0600).
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.config import LocalNodeSettings
from sidecar.local_opensearch import java, modules, security
from sidecar.local_opensearch.artifacts import Release, fetch
from sidecar.retrieval.identity import basic_authorization

SERVICE_USER = "opensearch-sidecar"
ROOT_HOME = Path("/var/lib/opensearch-sidecar")
_STOP_TIMEOUT_S = 60.0
_POLL_INTERVAL_S = 0.5

log = logging.getLogger(__name__)


class NodeError(RuntimeError):
    """The local node could not be installed, started or stopped; the message says why and where."""


@dataclass(frozen=True)
class NodeStatus:
    url: str
    home: Path
    pid: int | None
    healthy: bool
    version: str | None
    # Whether the installed k-NN plugin carries the faiss native library (None: not installed).
    faiss_available: bool | None
    secure: bool = False
    # For a secured node: the demo root CA to verify it with, and where the admin password is.
    ca_certs: Path | None = None
    admin_password_file: Path | None = None

    @property
    def running(self) -> bool:
        return self.pid is not None


class LocalNode:
    """Install, start, stop and inspect the node for one HTTP port. Every operation is idempotent."""

    def __init__(self, settings: LocalNodeSettings, cache_dir: Path, environ: Mapping[str, str]):
        self._settings = settings
        self._cache_dir = cache_dir
        self._environ = environ
        self._as_root = os.geteuid() == 0
        base = settings.home or (ROOT_HOME if self._as_root else cache_dir / "nodes")
        self.home = base / str(settings.port)
        scheme = "https" if settings.secure else "http"
        self.url = f"{scheme}://127.0.0.1:{settings.port}"

    @property
    def _pid_file(self) -> Path:
        return self.home / "opensearch.pid"

    @property
    def _state_file(self) -> Path:
        return self.home / "node.json"

    @property
    def log_file(self) -> Path:
        return self.home / "logs" / "sidecar-local.log"

    @property
    def admin_password_file(self) -> Path:
        return self.home / "admin-password"

    def admin_password(self) -> str:
        """The secured node's admin password; raises NodeError if the node was never installed."""
        try:
            return self.admin_password_file.read_text().strip()
        except OSError as error:
            raise NodeError(f"no admin password at {self.admin_password_file}: {error}") from error

    def status(self) -> NodeStatus:
        state = self._read_state()
        pid = self._running_pid()
        secure = self._settings.secure
        install = self._install_dir(state)
        return NodeStatus(
            url=self.url,
            home=self.home,
            pid=pid,
            healthy=pid is not None and self._healthy(timeout_s=2.0),
            version=state.get("version"),
            faiss_available=state.get("faiss_available"),
            secure=secure,
            ca_certs=install / "config" / security.ROOT_CA if secure and install else None,
            admin_password_file=self.admin_password_file if secure else None,
        )

    def up(self) -> NodeStatus:
        """Install if needed, then start and wait for yellow health; a running node is left as is."""
        if self._running_pid() is not None:
            if not self._wait_healthy(time.monotonic() + self._settings.start_timeout_s):
                raise NodeError(
                    f"node at {self.url} is running but not healthy; see {self.log_file}"
                )
            return self.status()
        if _port_in_use(self._settings.port):
            raise NodeError(
                f"port {self._settings.port} is in use by another process; stop it or set "
                "SIDECAR_OPENSEARCH_PORT to a free port"
            )
        if self._as_root:
            _ensure_service_user()
        release, jdk = java.choose(
            self._requested_version(),
            self._settings.java_home,
            self._environ,
            self._run_as,
            secure=self._settings.secure,
        )
        install = self._install(release, jdk)
        self._write_config(install)
        self._start(install, jdk)
        return self.status()

    def down(self) -> bool:
        """Stop the node; returns False if it was not running."""
        pid = self._running_pid()
        if pid is None:
            self._pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(_POLL_INTERVAL_S)
        if _alive(pid):
            log.warning("node pid %d ignored SIGTERM for %.0fs; killing it", pid, _STOP_TIMEOUT_S)
            os.kill(pid, signal.SIGKILL)
        self._pid_file.unlink(missing_ok=True)
        return True

    def purge(self) -> bool:
        """Delete the stopped node's home (install, data, logs, password); the downloads cache is
        not touched. Returns False when there is no home. Raises NodeError while the node runs,
        or when the folder does not look like a node's home (it is never guessed at)."""
        if self._running_pid() is not None:
            raise NodeError(f"the node at {self.url} is running: stop it first")
        if not self.home.exists():
            return False
        if not (self._state_file.exists() or any(self.home.glob("opensearch-*"))):
            raise NodeError(f"{self.home} holds no node.json nor opensearch-*/: not removing it")
        shutil.rmtree(self.home)
        return True

    def _requested_version(self) -> str:
        """An installed node keeps its version unless another is asked for explicitly."""
        state = self._read_state()
        installed = state.get("version")
        if (
            self._settings.version == "auto"
            and installed
            and state.get("secure", False) == self._settings.secure
        ):
            return str(installed)
        return self._settings.version

    def _install_dir(self, state: dict[str, Any]) -> Path | None:
        version = state.get("version")
        return self.home / f"opensearch-{version}" if version else None

    def _install(self, release: Release, jdk: java.Java) -> Path:
        install = self.home / f"opensearch-{release.version}"
        state = self._read_state()
        if (
            state.get("version") == release.version
            and state.get("secure", False) == release.secure
            and install.is_dir()
        ):
            return install
        self.home.mkdir(parents=True, exist_ok=True)
        for stale in self.home.glob("opensearch-*"):
            shutil.rmtree(stale)
        archives = [
            fetch(a, self._cache_dir, allow_unverified=self._settings.allow_unverified)
            for a in release.artifacts
        ]
        log.info("installing OpenSearch %s into %s", release.version, install)
        _extract(archives[0], self.home)
        if not install.is_dir():
            raise NodeError(f"{archives[0]} did not contain opensearch-{release.version}/")
        try:
            modules.assemble(
                install, release, self._cache_dir, jdk.compiler, self._settings.allow_unverified
            )
        except modules.ModuleError as error:
            raise NodeError(str(error)) from error
        for plugin_zip in archives[1:]:
            completed = subprocess.run(
                [
                    str(install / "bin" / "opensearch-plugin"),
                    "install",
                    "--batch",
                    plugin_zip.as_uri(),
                ],
                env=self._java_env(jdk),
                capture_output=True,
                text=True,
            )
            if completed.returncode != 0:
                raise NodeError(f"installing {plugin_zip.name} failed:\n{completed.stderr[-2000:]}")
        faiss = any((install / "plugins" / "opensearch-knn").rglob("*faiss*.so"))
        if not faiss:
            log.warning(
                "the k-NN plugin zip carries no faiss native library: k-NN indices here use the "
                "lucene engine"
            )
        if release.secure:
            self._install_security(install, jdk)
        state = {"version": release.version, "faiss_available": faiss, "secure": release.secure}
        self._state_file.write_text(json.dumps(state, indent=2) + "\n")
        return install

    def _install_security(self, install: Path, jdk: java.Java) -> None:
        password = security.generate_password()
        try:
            security.install_demo(install, password, self._java_env(jdk))
        except security.SecurityError as error:
            raise NodeError(str(error)) from error
        security.write_password(self.admin_password_file, password)
        log.info(
            "secured node: user %s, password in %s (mode 0600; read it with `cat`), CA %s",
            security.ADMIN_USER,
            self.admin_password_file,
            install / "config" / security.ROOT_CA,
        )

    def _write_config(self, install: Path) -> None:
        for folder in ("data", "logs", "tmp"):
            (self.home / folder).mkdir(parents=True, exist_ok=True)
        config = {
            "cluster.name": "sidecar-local",
            "node.name": f"sidecar-local-{self._settings.port}",
            "discovery.type": "single-node",
            "network.host": "127.0.0.1",
            "http.port": self._settings.port,
            "path.data": str(self.home / "data"),
            "path.logs": str(self.home / "logs"),
            # A development node on a nearly full disk should not turn its indices read-only.
            "cluster.routing.allocation.disk.threshold_enabled": False,
        }
        lines = [f"{key}: {json.dumps(value)}" for key, value in config.items()]
        demo_section = install / "config" / security.DEMO_SECTION
        if demo_section.exists():
            lines.append(demo_section.read_text())
        (install / "config" / "opensearch.yml").write_text("\n".join(lines) + "\n")
        if self._as_root:
            user = pwd.getpwnam(SERVICE_USER)
            for path in [self.home, *self.home.rglob("*")]:
                os.lchown(path, user.pw_uid, user.pw_gid)

    def _start(self, install: Path, jdk: java.Java) -> None:
        self._pid_file.unlink(missing_ok=True)
        env = self._java_env(jdk)
        env["OPENSEARCH_JAVA_OPTS"] = f"-Xms{self._settings.heap} -Xmx{self._settings.heap}"
        env["OPENSEARCH_TMPDIR"] = str(self.home / "tmp")
        command = self._run_as(
            [str(install / "bin" / "opensearch"), "-d", "-p", str(self._pid_file)]
        )
        started = time.monotonic()
        with (self.home / "logs" / "startup.out").open("ab") as startup_output:
            completed = subprocess.run(
                command, env=env, stdout=startup_output, stderr=subprocess.STDOUT
            )
        if completed.returncode != 0:
            raise NodeError(
                f"OpenSearch exited with code {completed.returncode} while starting; see "
                f"{self.home / 'logs' / 'startup.out'} and {self.log_file}"
            )
        if not self._wait_healthy(started + self._settings.start_timeout_s):
            raise NodeError(
                f"OpenSearch did not become healthy within {self._settings.start_timeout_s:.0f}s; "
                f"see {self.log_file}"
            )
        log.info("OpenSearch up at %s after %.1fs", self.url, time.monotonic() - started)

    def _wait_healthy(self, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if self._healthy(timeout_s=5.0):
                return True
            if self._pid_file.exists() and self._running_pid() is None:
                return False  # the JVM died: waiting longer cannot help
            time.sleep(_POLL_INTERVAL_S)
        return False

    def _healthy(self, timeout_s: float) -> bool:
        url = f"{self.url}/_cluster/health?wait_for_status=yellow&timeout={int(timeout_s)}s"
        request = urllib.request.Request(url)
        context = None
        if self._settings.secure:
            install = self._install_dir(self._read_state())
            if install is None or not self.admin_password_file.exists():
                return False
            context = security.https_context(install)
            request.add_header(
                "Authorization", basic_authorization(security.ADMIN_USER, self.admin_password())
            )
        try:
            with urllib.request.urlopen(
                request, timeout=timeout_s + 1, context=context
            ) as response:
                return json.load(response).get("status") in {"yellow", "green"}
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _running_pid(self) -> int | None:
        """The pid from the pid file, if that process is alive and is an OpenSearch node."""
        try:
            pid = int(self._pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if b"org.opensearch.bootstrap.OpenSearch" in cmdline else None

    def _read_state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self._state_file.read_text())
        except (OSError, ValueError):
            return {}
        return state

    def _java_env(self, jdk: java.Java) -> dict[str, str]:
        env = {
            k: v for k, v in self._environ.items() if k not in {"JAVA_HOME", "JAVA_TOOL_OPTIONS"}
        }
        env["OPENSEARCH_JAVA_HOME"] = str(jdk.home)
        return env

    def _run_as(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", SERVICE_USER, "--", *argv] if self._as_root else argv


def _ensure_service_user() -> None:
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SERVICE_USER,
            ],
            check=True,
            capture_output=True,
        )


def _extract(archive: Path, destination: Path) -> None:
    """Unzip keeping the Unix permission bits (zipfile drops them; bin/ scripts need +x)."""
    with zipfile.ZipFile(archive) as bundle:
        for member in bundle.infolist():
            extracted = Path(bundle.extract(member, destination))
            mode = (member.external_attr >> 16) & 0o777
            if mode:
                extracted.chmod(mode)


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
