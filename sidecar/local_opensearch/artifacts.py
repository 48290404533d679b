"""OpenSearch distribution and plugin zips from Maven Central: which ones, download, verify, cache.

Each file is downloaded once into the cache and verified against the checksum Maven Central
publishes beside it; where none is published (the plugin zips), against a SHA-256 pinned here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

MAVEN_CENTRAL = "https://repo1.maven.org/maven2"
_CHUNK_BYTES = 1 << 20
# Strongest first: the first checksum Maven Central publishes for a file is the one checked.
_PUBLISHED_ALGORITHMS = ("sha512", "sha256", "sha1")

log = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """An artifact could not be fetched or failed verification; the message names the URL."""


@dataclass(frozen=True)
class Artifact:
    """One zip or jar on Maven Central, by coordinates."""

    group: str
    name: str
    version: str
    repository: str = MAVEN_CENTRAL
    extension: str = "zip"

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}.{self.extension}"

    @property
    def url(self) -> str:
        return f"{self.repository}/{self.group.replace('.', '/')}/{self.name}/{self.version}/{self.filename}"


def jar_artifact(group: str, name: str, version: str) -> Artifact:
    return Artifact(group, name, version, extension="jar")


@dataclass(frozen=True)
class Module:
    """A core module that an integ-test zip leaves out, assembled from its jars on Maven Central.

    Written to `modules/<name>/` with the plugin descriptor and security policy the full
    distribution ships for it."""

    name: str
    classname: str
    jars: tuple[Artifact, ...]
    extended_plugins: tuple[str, ...] = ()
    # Java permissions the module's code needs (the `grant` block of plugin-security.policy).
    permissions: tuple[str, ...] = ()


# The neural-search plugin is published as `neural-search` (installed as opensearch-neural-search).
_NEURAL_PLUGINS = (
    "opensearch-job-scheduler",
    "opensearch-ml-plugin",
    "opensearch-knn",
    "neural-search",
)


# The main classes of the modules put back, per major version: 3.0 renamed them.
_MODULE_CLASSNAMES = {
    2: {
        "lang-painless": "org.opensearch.painless.PainlessPlugin",
        "analysis-common": "org.opensearch.analysis.common.CommonAnalysisPlugin",
    },
    3: {
        "lang-painless": "org.opensearch.painless.PainlessModulePlugin",
        "analysis-common": "org.opensearch.analysis.common.CommonAnalysisModulePlugin",
    },
}
# What lang-painless 2.19.1 and 3.4.0 alike depend on (3.6.0 moved to asm 9.9.1, but its zip
# ships the module).
_PAINLESS_DEPENDENCIES = (
    jar_artifact("org.antlr", "antlr4-runtime", "4.13.1"),
    *(
        jar_artifact("org.ow2.asm", name, "9.7")
        for name in ("asm", "asm-analysis", "asm-commons", "asm-tree", "asm-util")
    ),
)


def modules_from_jars(version: str) -> tuple[Module, ...]:
    """lang-painless (which k-NN extends) and analysis-common (the index template's english
    analyzer), assembled from the `version` jars, for an integ-test zip that ships only the
    transport modules. Raises KeyError for a major version whose class names are not known."""
    classnames = _MODULE_CLASSNAMES[int(version.split(".")[0])]
    return (
        Module(
            "lang-painless",
            classnames["lang-painless"],
            jars=(
                jar_artifact("org.opensearch.plugin", "lang-painless", version),
                jar_artifact("org.opensearch.plugin", "opensearch-scripting-painless-spi", version),
                *_PAINLESS_DEPENDENCIES,
            ),
            # Painless compiles scripts into classes and loads allowlisted classes.
            permissions=(
                'java.lang.RuntimePermission "createClassLoader"',
                'java.lang.RuntimePermission "getClassLoader"',
            ),
        ),
        Module(
            "analysis-common",
            classnames["analysis-common"],
            jars=(jar_artifact("org.opensearch.plugin", "analysis-common", version),),
            extended_plugins=("lang-painless",),
        ),
    )


@dataclass(frozen=True)
class Release:
    """An OpenSearch version the project knows how to run, with the plugins it installs."""

    version: str
    min_java: int
    # Newest Java the release is known to start on; None means no known upper bound.
    max_java: int | None
    # In install order: job-scheduler and k-NN before the plugins that extend them.
    plugin_names: tuple[str, ...] = _NEURAL_PLUGINS
    # Core modules the integ-test zip leaves out and the plugins need.
    modules: tuple[Module, ...] = ()
    # Whether the security plugin is among the plugins (the node then serves HTTPS with users).
    secure: bool = False
    # Whether the security plugin extends `rule-framework`, which no registry publishes: the node
    # then compiles a stand-in, so it needs a JDK (javac), not only a Java runtime.
    rule_framework_stand_in: bool = False

    @property
    def distribution(self) -> Artifact:
        return Artifact("org.opensearch.distribution.integ-test-zip", "opensearch", self.version)

    @property
    def plugins(self) -> tuple[Artifact, ...]:
        plugin_version = f"{self.version}.0"
        return tuple(
            Artifact("org.opensearch.plugin", name, plugin_version) for name in self.plugin_names
        )

    @property
    def artifacts(self) -> tuple[Artifact, ...]:
        return (self.distribution, *self.plugins)


# Newest first. 3.x needs Java 21+; 2.19 is the newest line that still runs on Java 11-17 (and
# on 21). 3.6.0's zip ships every core module; 2.19.1 is the only 2.x with every plugin zip
# published, and its zip ships only transport-netty4.
RELEASES = (
    Release("3.6.0", min_java=21, max_java=None),
    Release("2.19.1", min_java=11, max_java=21, modules=modules_from_jars("2.19.1")),
)

# The releases whose security plugin is on Maven Central, the default first. 3.4.0 is the newest;
# neural-search and ml-commons are not published for it, so it is also the project's cluster
# without neural-search, and its security plugin extends `rule-framework` (see rule_framework/).
# 2.19.1 has the whole plugin set and extends nothing; it is also the secured node on Java 11-17.
SECURE_RELEASES = (
    Release(
        "3.4.0",
        min_java=21,
        max_java=None,
        plugin_names=("opensearch-job-scheduler", "opensearch-knn", "opensearch-security"),
        modules=modules_from_jars("3.4.0"),
        secure=True,
        rule_framework_stand_in=True,
    ),
    Release(
        "2.19.1",
        min_java=11,
        max_java=21,
        plugin_names=(*_NEURAL_PLUGINS, "opensearch-security"),
        modules=modules_from_jars("2.19.1"),
        secure=True,
    ),
)

# SHA-256 of files for which Maven Central publishes no checksum, recorded from a verified
# first download. A mismatch later means the file changed under the same coordinates.
PINNED_SHA256 = {
    "opensearch-job-scheduler-3.6.0.0.zip": "f81d0aa9fc850b18f803292bd7ae68bd33561f6c1d12db0f68529d40eddcee24",
    "opensearch-ml-plugin-3.6.0.0.zip": "c051d436fe1936da1477bb999db829eb2bc92b12989e376c300d0a874fb90f9d",
    "opensearch-knn-3.6.0.0.zip": "ac392ca28a39b3bf290648a422ef30cb149dda2963a9d7feb26060e932341c9a",
    "neural-search-3.6.0.0.zip": "6ef1b206e79391e2e36268e32dc34d27fd8b8a59a8eb0a7393c97d53b038e433",
    "opensearch-job-scheduler-2.19.1.0.zip": "a54e12582b88a4c173d6e58b16fbc609df12a04eff010ae30396905a1a882bf6",
    "opensearch-ml-plugin-2.19.1.0.zip": "2324234d81109dcb2c488da5a6b2034cc0f78d9d08e40ce49ba59fc423a5df5f",
    "neural-search-2.19.1.0.zip": "b17ca1d774692902c58cbae102bf463970740c31d81446866e8eabd336e285aa",
    "opensearch-security-2.19.1.0.zip": "94a04f12ac6033902209fac1e4e512618d45beee604bbf0e42c3ed79c55220cf",
    "opensearch-knn-3.4.0.0.zip": "f6cc96677277521e0dacc82aa078f87df70032026c8c7059623467a4141cfd2f",
}


def find_release(version: str, *, secure: bool = False) -> Release:
    """The known release (secured or not) with this version; raises ValueError listing the known ones."""
    releases = SECURE_RELEASES if secure else RELEASES
    for release in releases:
        if release.version == version:
            return release
    known = ", ".join(r.version for r in releases)
    where = "secured (Maven Central has its security plugin for these only)" if secure else "here"
    raise ValueError(f"OpenSearch {version} is not supported {where}; choose one of: {known}")


def candidate_releases(version: str, *, secure: bool = False) -> tuple[Release, ...]:
    """Releases that may serve a request for `version` ("auto" or X.Y.Z), newest first.

    Raises ValueError when `version` is not among the known (secured) releases."""
    if version == "auto":
        return SECURE_RELEASES if secure else RELEASES
    return (find_release(version, secure=secure),)


def fetch(artifact: Artifact, cache_dir: Path, *, allow_unverified: bool = False) -> Path:
    """Return the verified local copy of `artifact`, downloading it only if the cache lacks it.

    A cached copy is re-hashed against the digest recorded when it was first verified, so a
    warm cache needs no network.
    Raises DownloadError naming the URL when the download fails or the checksum does not match,
    and when no checksum exists at all unless `allow_unverified`.
    """
    target = cache_dir / "downloads" / artifact.filename
    record = target.with_name(target.name + ".sha256")
    if (
        target.exists()
        and record.exists()
        and _digest(target, "sha256") == record.read_text().strip()
    ):
        return target
    verifier = _checksum_for(artifact, allow_unverified=allow_unverified)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    _download(artifact.url, partial)
    if verifier is not None:
        algorithm, expected = verifier
        actual = _digest(partial, algorithm)
        if actual != expected:
            partial.unlink()
            raise DownloadError(
                f"{artifact.url}: {algorithm} checksum mismatch (expected {expected}, got {actual})"
            )
    os.replace(partial, target)
    # Verified once against the remote checksum; later runs check against this, offline.
    record.write_text(_digest(target, "sha256") + "\n")
    return target


def _checksum_for(artifact: Artifact, *, allow_unverified: bool) -> tuple[str, str] | None:
    """(algorithm, hex digest) to verify against: published beside the file, else pinned here."""
    for algorithm in _PUBLISHED_ALGORITHMS:
        try:
            with urllib.request.urlopen(f"{artifact.url}.{algorithm}", timeout=30) as response:
                return algorithm, response.read().decode().split()[0].strip().lower()
        except urllib.error.HTTPError as error:
            if error.code != 404:
                raise DownloadError(f"{artifact.url}.{algorithm}: HTTP {error.code}") from error
        except (urllib.error.URLError, TimeoutError) as error:
            raise DownloadError(f"{artifact.url}.{algorithm}: {error}") from error
    pinned = PINNED_SHA256.get(artifact.filename)
    if pinned is not None:
        return "sha256", pinned
    if allow_unverified:
        log.warning("%s has no published or pinned checksum; using it unverified", artifact.url)
        return None
    raise DownloadError(
        f"{artifact.url} has no published checksum and none is pinned in the project; "
        "set SIDECAR_OPENSEARCH_ALLOW_UNVERIFIED=1 to accept it anyway"
    )


def _download(url: str, destination: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, destination.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1]) as bar:
                while chunk := response.read(_CHUNK_BYTES):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        destination.unlink(missing_ok=True)
        raise DownloadError(f"download of {url} failed: {error}") from error


def _digest(path: Path, algorithm: str) -> str:
    hasher = hashlib.new(algorithm)
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            hasher.update(chunk)
    return hasher.hexdigest()
