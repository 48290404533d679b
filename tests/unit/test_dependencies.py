"""The floors in pyproject.toml that keep releases with known vulnerabilities out."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

PYPROJECT = Path(__file__).parents[2] / "pyproject.toml"


def requirement(name: str) -> Requirement:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    return next(r for r in map(Requirement, dependencies) if r.name == name)


@pytest.mark.parametrize("release", ["3.10.10", "3.11.18", "3.12.13", "3.13.3", "3.14.0"])
def test_aiohttp_releases_with_known_server_advisories_are_refused(release: str) -> None:
    # The server's HTTP parser got request-smuggling fixes in 3.10.11 and again in 3.12.14, more
    # server fixes in 3.13.3 and 3.13.4, and a bound on queued pipelined requests in 3.14.1:
    # every client request passes through it.
    assert not requirement("aiohttp").specifier.contains(release)


def test_the_installed_aiohttp_meets_the_floor() -> None:
    assert requirement("aiohttp").specifier.contains(version("aiohttp"))
