import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.local_opensearch.artifacts import (
    PINNED_SHA256,
    RELEASES,
    SECURE_RELEASES,
    Artifact,
    DownloadError,
    candidate_releases,
    fetch,
    find_release,
    modules_from_jars,
)

PAYLOAD = b"pretend this is a zip" * 100


class Repository:
    """A Maven-layout HTTP server on port 0 that records which paths were requested."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        repository = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self) -> None:
                repository.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def publish(self, artifact: Artifact, payload: bytes, checksums: dict[str, str]) -> None:
        folder = self.root / artifact.group.replace(".", "/") / artifact.name / artifact.version
        folder.mkdir(parents=True, exist_ok=True)
        (folder / artifact.filename).write_bytes(payload)
        for algorithm, digest in checksums.items():
            (folder / f"{artifact.filename}.{algorithm}").write_text(
                f"{digest}  {artifact.filename}\n"
            )


@pytest.fixture
def repository(tmp_path: Path) -> Iterator[Repository]:
    repo = Repository(tmp_path / "repo")
    thread = threading.Thread(target=repo.server.serve_forever, daemon=True)
    thread.start()
    yield repo
    repo.server.shutdown()
    repo.server.server_close()


def artifact_in(repository: Repository, name: str = "thing") -> Artifact:
    return Artifact("org.example", name, "1.0", repository=repository.url)


def test_downloads_verifies_against_published_checksum_and_caches(
    repository: Repository, tmp_path: Path
) -> None:
    artifact = artifact_in(repository)
    repository.publish(artifact, PAYLOAD, {"sha512": hashlib.sha512(PAYLOAD).hexdigest()})
    cached = fetch(artifact, tmp_path / "cache")
    assert cached.read_bytes() == PAYLOAD
    requests_after_first = len(repository.requests)
    assert fetch(artifact, tmp_path / "cache") == cached
    assert len(repository.requests) == requests_after_first, (
        "a warm cache must not touch the network"
    )


def test_checksum_mismatch_names_the_url_and_keeps_nothing(
    repository: Repository, tmp_path: Path
) -> None:
    artifact = artifact_in(repository)
    repository.publish(artifact, PAYLOAD, {"sha1": hashlib.sha1(b"other").hexdigest()})
    with pytest.raises(DownloadError, match=r"thing-1\.0\.zip: sha1 checksum mismatch"):
        fetch(artifact, tmp_path / "cache")
    assert list((tmp_path / "cache" / "downloads").iterdir()) == []


def test_corrupted_cache_is_downloaded_again(repository: Repository, tmp_path: Path) -> None:
    artifact = artifact_in(repository)
    repository.publish(artifact, PAYLOAD, {"sha256": hashlib.sha256(PAYLOAD).hexdigest()})
    cached = fetch(artifact, tmp_path / "cache")
    cached.write_bytes(b"truncated")
    assert fetch(artifact, tmp_path / "cache").read_bytes() == PAYLOAD


def test_missing_checksum_is_refused_unless_allowed(repository: Repository, tmp_path: Path) -> None:
    artifact = artifact_in(repository)
    repository.publish(artifact, PAYLOAD, {})
    with pytest.raises(DownloadError, match="SIDECAR_OPENSEARCH_ALLOW_UNVERIFIED"):
        fetch(artifact, tmp_path / "cache")
    assert fetch(artifact, tmp_path / "cache", allow_unverified=True).read_bytes() == PAYLOAD


def test_download_failure_names_the_url(repository: Repository, tmp_path: Path) -> None:
    artifact = artifact_in(repository, "absent")
    repository.publish(artifact_in(repository, "absent"), PAYLOAD, {})
    (tmp_path / "repo" / "org/example/absent/1.0" / artifact.filename).unlink()
    with pytest.raises(
        DownloadError, match=r"download of http://127\.0\.0\.1:\d+/.*/absent-1\.0\.zip failed"
    ):
        fetch(artifact, tmp_path / "cache", allow_unverified=True)


def test_releases_name_their_maven_coordinates() -> None:
    release = find_release("3.6.0")
    assert release.distribution.url == (
        "https://repo1.maven.org/maven2/org/opensearch/distribution/integ-test-zip/opensearch/3.6.0/opensearch-3.6.0.zip"
    )
    assert [p.name for p in release.plugins] == [
        "opensearch-job-scheduler",
        "opensearch-ml-plugin",
        "opensearch-knn",
        "neural-search",
    ]
    assert {p.version for p in release.plugins} == {"3.6.0.0"}
    assert RELEASES[0] is release, "newest first"


def test_unknown_release_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"choose one of: 3\.6\.0, 2\.19\.1"):
        find_release("1.0.0")


def test_the_2_19_line_puts_back_the_modules_k_nn_needs_under_their_2_x_class_names() -> None:
    newest, fallback = RELEASES
    assert newest.modules == (), "3.6.0's integ-test zip ships every core module"
    assert (fallback.version, fallback.min_java, fallback.max_java) == ("2.19.1", 11, 21)
    assert fallback.modules == modules_from_jars("2.19.1")
    painless, analysis = fallback.modules
    assert (painless.name, painless.classname) == (
        "lang-painless",
        "org.opensearch.painless.PainlessPlugin",
    )
    assert (analysis.name, analysis.classname) == (
        "analysis-common",
        "org.opensearch.analysis.common.CommonAnalysisPlugin",
    )
    assert [jar.filename for jar in painless.jars] == [
        "lang-painless-2.19.1.jar",
        "opensearch-scripting-painless-spi-2.19.1.jar",
        "antlr4-runtime-4.13.1.jar",
        "asm-9.7.jar",
        "asm-analysis-9.7.jar",
        "asm-commons-9.7.jar",
        "asm-tree-9.7.jar",
        "asm-util-9.7.jar",
    ]
    assert [jar.filename for jar in analysis.jars] == ["analysis-common-2.19.1.jar"]
    assert analysis.extended_plugins == ("lang-painless",)
    assert [p.filename for p in fallback.plugins] == [
        "opensearch-job-scheduler-2.19.1.0.zip",
        "opensearch-ml-plugin-2.19.1.0.zip",
        "opensearch-knn-2.19.1.0.zip",
        "neural-search-2.19.1.0.zip",
    ]


def test_the_3_x_modules_carry_the_renamed_classes() -> None:
    painless, analysis = modules_from_jars("3.4.0")
    assert painless.classname == "org.opensearch.painless.PainlessModulePlugin"
    assert analysis.classname == "org.opensearch.analysis.common.CommonAnalysisModulePlugin"
    assert "lang-painless-3.4.0.jar" in [jar.filename for jar in painless.jars]
    with pytest.raises(KeyError):
        modules_from_jars("1.3.20")


def test_the_default_secured_release_is_3_4_0_with_its_rule_framework_stand_in() -> None:
    default = candidate_releases("auto", secure=True)[0]
    assert candidate_releases("3.4.0", secure=True) == (default,)
    assert (default.version, default.secure, default.rule_framework_stand_in) == (
        "3.4.0",
        True,
        True,
    )
    assert [p.filename for p in default.plugins] == [
        "opensearch-job-scheduler-3.4.0.0.zip",
        "opensearch-knn-3.4.0.0.zip",
        "opensearch-security-3.4.0.0.zip",
    ]
    assert default.modules == modules_from_jars("3.4.0")


def test_the_secured_2_19_1_release_has_neural_search_and_ml_and_no_stand_in() -> None:
    assert [r.version for r in candidate_releases("auto", secure=True)] == ["3.4.0", "2.19.1"]
    (release,) = candidate_releases("2.19.1", secure=True)
    assert (release.secure, release.rule_framework_stand_in) == (True, False)
    assert (release.min_java, release.max_java) == (11, 21)
    assert [p.name for p in release.plugins] == [
        "opensearch-job-scheduler",
        "opensearch-ml-plugin",
        "opensearch-knn",
        "neural-search",
        "opensearch-security",
    ]
    assert {p.version for p in release.plugins} == {"2.19.1.0"}
    assert release.modules == modules_from_jars("2.19.1")
    (plain,) = candidate_releases("2.19.1")
    assert not plain.secure


def test_a_version_without_a_security_plugin_is_refused_for_the_secured_node() -> None:
    with pytest.raises(
        ValueError, match=r"not supported secured.*choose one of: 3\.4\.0, 2\.19\.1"
    ):
        candidate_releases("3.6.0", secure=True)
    with pytest.raises(ValueError, match=r"choose one of: 3\.6\.0, 2\.19\.1"):
        candidate_releases("3.4.0")


def test_every_pinned_digest_belongs_to_a_known_release() -> None:
    """A pin left behind by a release no longer listed is dead weight (and hides a typo)."""
    known = {
        artifact.filename
        for release in (*RELEASES, *SECURE_RELEASES)
        for artifact in release.artifacts
    }
    assert set(PINNED_SHA256) <= known
