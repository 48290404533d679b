from pathlib import Path

import pytest

from sidecar.local_opensearch.java import JavaError, choose, probe


def fake_jdk(root: Path, version_line: str) -> Path:
    """A JDK home whose bin/java prints `version_line` to stderr, as `java -version` does."""
    home = root / version_line.replace('"', "").replace(" ", "_")
    (home / "bin").mkdir(parents=True)
    java = home / "bin" / "java"
    java.write_text(f"#!/bin/sh\necho '{version_line}' >&2\n")
    java.chmod(0o755)
    return home


def test_probe_reads_modern_and_legacy_version_strings(tmp_path: Path) -> None:
    jdk25 = probe(fake_jdk(tmp_path, 'openjdk version "25.0.3" 2026-04-21 LTS'))
    jdk8 = probe(fake_jdk(tmp_path, 'java version "1.8.0_412"'))
    assert jdk25 is not None
    assert jdk25.major == 25
    assert jdk8 is not None
    assert jdk8.major == 8
    assert probe(tmp_path / "nowhere") is None


def test_auto_picks_newest_release_the_java_runs(tmp_path: Path) -> None:
    home = fake_jdk(tmp_path, 'openjdk version "21.0.5"')
    release, java = choose("auto", home, {})
    assert release.version == "3.6.0"
    assert java.major == 21


def test_java_17_falls_back_to_the_2_19_line(tmp_path: Path) -> None:
    release, java = choose("auto", fake_jdk(tmp_path, 'openjdk version "17.0.15"'), {})
    assert (release.version, release.secure, java.major) == ("2.19.1", False, 17)


def test_2_19_1_runs_on_java_21_but_not_on_25(tmp_path: Path) -> None:
    """Java 24 removed the security manager that 2.x turns on at start."""
    release, _ = choose("2.19.1", fake_jdk(tmp_path, 'openjdk version "21.0.5"'), {})
    assert release.version == "2.19.1"
    with pytest.raises(JavaError, match=r"2\.19\.1 needs Java 11-21"):
        choose("2.19.1", fake_jdk(tmp_path, 'openjdk version "25.0.3"'), {})


def test_no_suitable_java_says_what_is_needed(tmp_path: Path) -> None:
    home = fake_jdk(tmp_path, 'java version "1.8.0_412"')
    with pytest.raises(JavaError, match=r"found Java 8 at .*OpenSearch 3\.6\.0 needs Java 21\+"):
        choose("auto", home, {})


def test_explicit_version_is_held_to_its_java_range(tmp_path: Path) -> None:
    home = fake_jdk(tmp_path, 'openjdk version "17.0.15"')
    with pytest.raises(JavaError, match="needs Java 21"):
        choose("3.6.0", home, {})


def test_an_unknown_version_is_refused_before_any_java_is_probed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"OpenSearch 9\.9\.9 is not supported"):
        choose("9.9.9", tmp_path / "no-such-jdk", {})


def test_the_secured_3_4_0_node_needs_a_jdk_with_javac(tmp_path: Path) -> None:
    """It compiles its rule-framework stand-in; a runtime without javac cannot build it."""
    home = fake_jdk(tmp_path, 'openjdk version "25.0.3"')
    with pytest.raises(JavaError, match=r"3\.4\.0 needs Java 21\+ with javac"):
        choose("auto", home, {}, secure=True)
    (home / "bin" / "javac").write_text("#!/bin/sh\n")
    release, java = choose("auto", home, {}, secure=True)
    assert (release.version, release.secure) == ("3.4.0", True)
    assert java.compiler == home / "bin" / "javac"


def test_a_java_17_runtime_gets_the_secured_2_19_1_node(tmp_path: Path) -> None:
    """Its security plugin extends nothing, so no JDK is needed."""
    home = fake_jdk(tmp_path, 'openjdk version "17.0.15"')
    release, java = choose("auto", home, {}, secure=True)
    assert (release.version, release.secure, java.compiler) == ("2.19.1", True, None)


def test_an_explicit_secured_2_19_1_is_chosen_beside_a_java_that_runs_3_4_0(
    tmp_path: Path,
) -> None:
    home = fake_jdk(tmp_path, 'openjdk version "21.0.5"')
    (home / "bin" / "javac").write_text("#!/bin/sh\n")
    assert choose("auto", home, {}, secure=True)[0].version == "3.4.0"
    release, _ = choose("2.19.1", home, {}, secure=True)
    assert (release.version, release.secure) == ("2.19.1", True)
