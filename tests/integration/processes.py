"""What the tests' own servers (Prometheus, Redis, Toxiproxy, dockerd, `sidecar serve`) share: a
free port to start on and the binary to run; `sidecar.processes.stop` stops them."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path


def free_port() -> int:
    """A 127.0.0.1 port that was free a moment ago; should another process take it first, the
    server fails to start, with its log, rather than hanging."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def find_binary(
    variable: str,
    name: str,
    install_hint: str,
    error: type[Exception],
    environ: Mapping[str, str] = os.environ,
) -> Path:
    """The binary `variable` names (and then it must be executable, so that a typo is not hidden
    by a fallback), else `name` on PATH, else Debian's /usr/bin/<name>. Raises `error` saying how
    to install it when none is found."""
    if explicit := environ.get(variable):
        path = Path(explicit)
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise error(f"{variable}={explicit} is not an executable file; {install_hint}")
    if found := shutil.which(name, path=environ.get("PATH", os.defpath)):
        return Path(found)
    debian = Path("/usr/bin") / name
    if os.access(debian, os.X_OK):
        return debian
    raise error(f"no {name} binary found; {install_hint}")
