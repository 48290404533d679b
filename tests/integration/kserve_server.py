"""A real KServe model server for the remote-reranker tests: the `kserve` package's own server (v2
inference protocol) running kserve_model.py on a free port, from a virtualenv of its own that uv
makes on first use under the sidecar's cache folder (kserve's pins are not the sidecar's)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from tests.integration.model_servers import ModelServer
from tests.integration.processes import free_port

KSERVE_VERSION = "0.21.0"
# What the model program imports besides kserve, pinned to the versions the sidecar runs: a model
# saved by one sentence-transformers loads in that one, the server scores with the in-process
# runtime's code, and uv links torch from the cache that the sidecar's own install filled.
MODEL_PACKAGES = ("torch", "transformers", "sentence-transformers")
MODEL_PROGRAM = Path(__file__).with_name("kserve_model.py")


class KServeError(RuntimeError):
    """The kserve virtualenv could not be made, or its server exited or never became ready."""


KSERVE = ModelServer("KServe", f"kserve-{KSERVE_VERSION}", KServeError)


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
    """The interpreter of <cache_dir>/venvs/kserve-<version>, made on first use with
    kserve_requirements() (ModelServer.venv). Raises KServeError (no uv) and CalledProcessError
    (uv failed)."""
    return KSERVE.venv(kserve_requirements(), environ=environ) / "bin" / "python"


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
    /v2/health/ready answers; stopped on exit. Raises KServeError with the server's log tail when
    it exits or is not ready in time (ModelServer.running)."""
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
    server_environ = {**environ, "HF_HUB_OFFLINE": "1"}
    with KSERVE.running(
        command, url=server.url, ready_path="/v2/health/ready", environ=server_environ
    ):
        yield server
