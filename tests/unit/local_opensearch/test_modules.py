"""Modules assembled from jars: what lands in `modules/`, per release line, from a warm cache."""

import hashlib
from pathlib import Path

import pytest

from sidecar.local_opensearch.artifacts import Release, candidate_releases, find_release
from sidecar.local_opensearch.modules import ModuleError, assemble


def warm_cache(cache: Path, release: Release) -> None:
    """Put every module jar in the cache as `fetch` records a verified download (no network)."""
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    for module in release.modules:
        for jar in module.jars:
            payload = f"pretend {jar.filename}".encode()
            (downloads / jar.filename).write_bytes(payload)
            (downloads / f"{jar.filename}.sha256").write_text(
                hashlib.sha256(payload).hexdigest() + "\n"
            )


def descriptor(folder: Path) -> dict[str, str]:
    lines = (folder / "plugin-descriptor.properties").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines)


def test_2_19_1_gets_painless_and_analysis_common_under_their_2_x_classes(tmp_path: Path) -> None:
    release = find_release("2.19.1")
    warm_cache(tmp_path / "cache", release)
    assemble(tmp_path / "install", release, tmp_path / "cache", javac=None, allow_unverified=False)
    modules = tmp_path / "install" / "modules"
    painless = descriptor(modules / "lang-painless")
    assert painless["classname"] == "org.opensearch.painless.PainlessPlugin"
    assert (painless["version"], painless["opensearch.version"]) == ("2.19.1", "2.19.1")
    assert painless["java.version"] == "11"
    assert len(list((modules / "lang-painless").glob("*.jar"))) == 8
    assert "createClassLoader" in (modules / "lang-painless" / "plugin-security.policy").read_text()
    analysis = descriptor(modules / "analysis-common")
    assert analysis["classname"] == "org.opensearch.analysis.common.CommonAnalysisPlugin"
    assert analysis["extended.plugins"] == "lang-painless"
    assert not (modules / "analysis-common" / "plugin-security.policy").exists()
    assert sorted(p.name for p in modules.iterdir()) == ["analysis-common", "lang-painless"]


def test_the_secured_2_19_1_node_builds_no_rule_framework_and_needs_no_javac(
    tmp_path: Path,
) -> None:
    (release,) = candidate_releases("2.19.1", secure=True)
    warm_cache(tmp_path / "cache", release)
    assemble(tmp_path / "install", release, tmp_path / "cache", javac=None, allow_unverified=False)
    assert sorted(p.name for p in (tmp_path / "install" / "modules").iterdir()) == [
        "analysis-common",
        "lang-painless",
    ]


def test_the_secured_3_4_0_node_refuses_to_assemble_without_javac(tmp_path: Path) -> None:
    (release,) = candidate_releases("3.4.0", secure=True)
    warm_cache(tmp_path / "cache", release)
    with pytest.raises(ModuleError, match="needs a JDK"):
        assemble(
            tmp_path / "install", release, tmp_path / "cache", javac=None, allow_unverified=False
        )
    painless = descriptor(tmp_path / "install" / "modules" / "lang-painless")
    assert painless["classname"] == "org.opensearch.painless.PainlessModulePlugin"
