"""A real KServe model server for the remote-reranker tests: the `kserve` package's own server (v2
inference protocol) running kserve_model.py on a free port, from a virtualenv of its own that uv
makes on first use under the sidecar's cache folder (kserve's pins are not the sidecar's)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from sidecar.config import Settings
from sidecar.processes import stop
from tests.integration.processes import free_port

KSERVE_VERSION = "0.21.0"
# What the model program imports besides kserve, pinned to the versions the sidecar runs: a model
# saved by one sentence-transformers loads in that one, the server scores with the in-process
# runtime's code, and uv links torch from the cache that the sidecar's own install filled.
MODEL_PACKAGES = ("torch", "transformers", "sentence-transformers")
MODEL_PROGRAM = Path(__file__).with_name("kserve_model.py")
INSTALL_TIMEOUT_S = 1800.0
READY_TIMEOUT_S = 180.0
POLL_INTERVAL_S = 0.2
STOP_TIMEOUT_S = 15.0
LOG_TAIL_BYTES = 4000


class KServeError(RuntimeError):
    """The kserve virtualenv could not be made, or its server exited or never became ready."""


@dataclass(frozen=True)
class KServeServer:
    # http://127.0.0.1:<port>, the v2 protocol's root.
    url: str
    # The model's name in /v2/models/{model}/...
    model: str


def kserve_requirements() -> list[str]:
    return [
        f"kserve=={KSERVE_VERSION}",
        *(f"{name}=={metadata.version(name)}" for name in MODEL_PACKAGES),
    ]


def kserve_python(environ: Mapping[str, str] = os.environ) -> Path:
    """The interpreter of <cache_dir>/venvs/kserve-<version>, made (or remade, when the pins or
    this Python changed) with the uv beside this interpreter, progress printed. A stamp written
    last marks a finished install; a lock keeps two test sessions from installing at once.
    Raises KServeError (no uv) and CalledProcessError (uv failed)."""
    venv = Settings.from_env(environ).cache_dir / "venvs" / f"kserve-{KSERVE_VERSION}"
    python = venv / "bin" / "python"
    stamp = venv / ".requirements"
    requirements = kserve_requirements()
    wanted = "\n".join([sys.version.split()[0], *requirements]) + "\n"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with (venv.parent / f"{venv.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text() == wanted:
            return python
        uv = Path(sys.executable).with_name("uv")
        if not uv.is_file():
            raise KServeError(f"no uv beside {sys.executable}: `make install` puts it there")
        print(f"kserve tests: installing {' '.join(requirements)} into {venv}", flush=True)
        started = time.monotonic()
        for command in (
            [str(uv), "venv", "--clear", "--quiet", "--python", sys.executable, str(venv)],
            [str(uv), "pip", "install", "--python", str(python), *requirements],
        ):
            subprocess.run(command, env=dict(environ), check=True, timeout=INSTALL_TIMEOUT_S)
        stamp.write_text(wanted)
        print(f"kserve tests: installed in {time.monotonic() - started:.0f} s", flush=True)
    return python


@contextmanager
def running_kserve(
    model_dir: Path,
    name: str = "reranker",
    max_length: int | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Iterator[KServeServer]:
    """kserve_model.py serving the cross-encoder in `model_dir` as `name`, cutting pairs at
    `max_length` tokens (None: the model's own), gRPC off, offline. KServe's server listens on
    every interface (its host is not configurable); the tests reach it at 127.0.0.1. Yields once
    /v2/health/ready answers; stopped (SIGTERM, then SIGKILL) on exit. Raises KServeError with
    the server's log tail when it exits or is not ready within READY_TIMEOUT_S."""
    python = kserve_python(environ)
    port = free_port()
    command = [
        str(python),
        "-I",  # only the kserve virtualenv: not this folder's modules, not PYTHONPATH
        str(MODEL_PROGRAM),
        f"--model_dir={model_dir}",
        f"--model_name={name}",
        f"--http_port={port}",
        "--enable_grpc=false",
    ]
    if max_length is not None:
        command.append(f"--max_length={max_length}")
    server = KServeServer(f"http://127.0.0.1:{port}", name)
    with tempfile.TemporaryDirectory(prefix="kserve-") as workdir:
        log_path = Path(workdir) / "server.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                cwd=workdir,
                env={**environ, "HF_HUB_OFFLINE": "1"},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_until_ready(process, server, log_path)
            yield server
        finally:
            stop(process, STOP_TIMEOUT_S)


def _wait_until_ready(process: subprocess.Popen[bytes], server: KServeServer, log: Path) -> None:
    """Poll /v2/health/ready; fail at once if the process exits (bad model, port taken)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if (status := process.poll()) is not None:
            raise KServeError(f"the KServe server exited with {status}; log tail:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(f"{server.url}/v2/health/ready", timeout=1.0) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet: the model loads before the server binds
        if time.monotonic() >= deadline:
            raise KServeError(
                f"the KServe server at {server.url} was not ready within {READY_TIMEOUT_S:.0f} s; "
                f"log tail:\n{_tail(log)}"
            )
        time.sleep(POLL_INTERVAL_S)


def _tail(log: Path) -> str:
    with log.open("rb") as file:
        file.seek(max(0, log.stat().st_size - LOG_TAIL_BYTES))
        return file.read().decode(errors="replace")
