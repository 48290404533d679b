import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.local_opensearch.artifacts import (
    RELEASES,
    SECURE_RELEASE,
    Artifact,
    DownloadError,
    candidate_releases,
    fetch,
    find_release,
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
    with pytest.raises(ValueError, match=r"choose one of: 3\.6\.0, 2\.19\.6"):
        find_release("1.0.0")


def test_the_secured_release_brings_security_and_the_modules_its_zip_lacks() -> None:
    assert candidate_releases("auto", secure=True) == (SECURE_RELEASE,)
    assert candidate_releases("3.4.0", secure=True) == (SECURE_RELEASE,)
    assert [p.filename for p in SECURE_RELEASE.plugins] == [
        "opensearch-job-scheduler-3.4.0.0.zip",
        "opensearch-knn-3.4.0.0.zip",
        "opensearch-security-3.4.0.0.zip",
    ]
    painless, analysis = SECURE_RELEASE.modules
    assert painless.name == "lang-painless"
    assert "lang-painless-3.4.0.jar" in [jar.filename for jar in painless.jars]
    assert analysis.extended_plugins == ("lang-painless",)
    with pytest.raises(ValueError, match=r"secured node runs OpenSearch 3\.4\.0 only"):
        candidate_releases("3.6.0", secure=True)
