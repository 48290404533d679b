"""Pinned Go tools and modules for the tests, fetched through the Go toolchain: commands built once
by `go install` into the download cache (Toxiproxy, kustomize), and module files read in place
(CRD schemas). Every module is checked by Go against go.sum and sum.golang.org."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sidecar.config import Settings


@dataclass(frozen=True)
class GoTool:
    """A command built by `go install` from one pinned version of its Go module."""

    # The cache folder is <cache_dir>/tools/<name>-<version>.
    name: str
    module: str
    version: str
    # The file `go install` writes: the last element of the package path, less a /vN suffix.
    binary: str
    # The command's package inside the module; "" is the module's root.
    package: str = ""
    # An environment variable that names a prebuilt binary to use instead.
    override: str = ""


def _go(environ: Mapping[str, str], purpose: str) -> str:
    """The `go` command, with checksum verification on. Raises RuntimeError saying what needs Go."""
    go = shutil.which("go", path=environ.get("PATH"))
    if go is None:
        raise RuntimeError(f"{purpose} needs Go on the PATH (https://go.dev/doc/install)")
    sumdb = subprocess.run(
        [go, "env", "GOSUMDB"], env=dict(environ), capture_output=True, text=True, check=True
    ).stdout.strip()
    if sumdb == "off":
        raise RuntimeError(f"{purpose}: GOSUMDB=off, so Go would not verify the pinned module")
    return go


def go_tool_binary(tool: GoTool, environ: Mapping[str, str] = os.environ) -> Path:
    """The tool's binary: `tool.override` when set; else built once into the download cache.

    The Go toolchain checks the module and every dependency against go.sum and sum.golang.org;
    the result is installed only after `go version -m` shows it was built from the pinned
    version, and moved into place whole (an interrupted build leaves no binary behind).
    Raises RuntimeError (no Go, or a binary of another version) and CalledProcessError."""
    if tool.override and (given := environ.get(tool.override)):
        return Path(given)
    target = Settings.from_env(environ).cache_dir / "tools" / f"{tool.name}-{tool.version}"
    binary = target / tool.binary
    if binary.is_file():
        return binary
    package = f"{tool.module}/{tool.package}".rstrip("/")
    go = _go(environ, f"building {tool.name} ({package}@{tool.version})")
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as staging:
        subprocess.run(
            [go, "install", f"{package}@{tool.version}"],
            env={**environ, "GOBIN": staging},
            cwd=staging,
            check=True,
            timeout=900,
        )
        built = Path(staging) / tool.binary
        info = subprocess.run(
            [go, "version", "-m", str(built)], capture_output=True, text=True, check=True
        ).stdout
        if not re.search(
            rf"^\s*mod\s+{re.escape(tool.module)}\s+{re.escape(tool.version)}\s", info, re.M
        ):
            raise RuntimeError(f"{built} is not {tool.module}@{tool.version}:\n{info}")
        built.replace(binary)
    return binary


def go_module_dir(module: str, version: str, environ: Mapping[str, str] = os.environ) -> Path:
    """The files of one version of a Go module (read-only, in Go's module cache), downloaded if
    need be and verified by the Go toolchain against sum.golang.org. Raises RuntimeError."""
    go = _go(environ, f"fetching {module}@{version}")
    # Outside any go.mod, so that the download depends on nothing else.
    with tempfile.TemporaryDirectory() as outside:
        answer = subprocess.run(
            [go, "mod", "download", "-json", f"{module}@{version}"],
            env=dict(environ),
            cwd=outside,
            capture_output=True,
            text=True,
            timeout=600,
        )
    info = json.loads(answer.stdout or "{}")
    if answer.returncode != 0 or "Error" in info or "Dir" not in info:
        raise RuntimeError(
            f"go mod download {module}@{version}: {info.get('Error') or answer.stderr}"
        )
    return Path(info["Dir"])
