"""Core modules an integ-test zip leaves out, put back into an install before plugins are added.

Two kinds: modules assembled from their published jars (a descriptor and a security policy
written beside them, as the full distribution ships them), and the `rule-framework` stand-in,
compiled here from the one Java file next to this module because no registry publishes it.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from sidecar.local_opensearch.artifacts import Module, Release, fetch, jar_artifact

# The security plugin's classes expect commons-collections4 from the module it extends.
_RULE_FRAMEWORK_DEPENDENCIES = (jar_artifact("org.apache.commons", "commons-collections4", "4.4"),)
_RULE_FRAMEWORK_SOURCE = Path(__file__).with_name("rule_framework") / "RuleFrameworkPlugin.java"
RULE_FRAMEWORK = "rule-framework"


class ModuleError(RuntimeError):
    """A module could not be assembled or compiled; the message names the step."""


def assemble(
    install: Path, release: Release, cache_dir: Path, javac: Path | None, allow_unverified: bool
) -> None:
    """Write each missing module into `install/modules/`; where the release's security plugin
    extends rule-framework, also its stand-in (compiled with `javac`, required then)."""
    for module in release.modules:
        folder = _fresh(install / "modules" / module.name)
        for jar in module.jars:
            shutil.copy2(fetch(jar, cache_dir, allow_unverified=allow_unverified), folder)
        _describe(folder, module, release)
    if release.rule_framework_stand_in:
        if javac is None:
            raise ModuleError(
                f"the secured {release.version} node needs a JDK (javac) to build its "
                "rule-framework stand-in"
            )
        _build_rule_framework(install, release, cache_dir, javac, allow_unverified)


def _build_rule_framework(
    install: Path, release: Release, cache_dir: Path, javac: Path, allow_unverified: bool
) -> None:
    folder = _fresh(install / "modules" / RULE_FRAMEWORK)
    for jar in _RULE_FRAMEWORK_DEPENDENCIES:
        shutil.copy2(fetch(jar, cache_dir, allow_unverified=allow_unverified), folder)
    with tempfile.TemporaryDirectory() as scratch:
        classes = Path(scratch)
        _run(
            [
                str(javac),
                "--release",
                str(release.min_java),
                "-classpath",
                str(install / "lib" / "*"),
                "-d",
                str(classes),
                str(_RULE_FRAMEWORK_SOURCE),
            ],
            "compiling the rule-framework stand-in",
        )
        jar_tool = javac.with_name("jar")
        _run(
            [
                str(jar_tool),
                "--create",
                "--file",
                str(folder / "rule-framework.jar"),
                "-C",
                str(classes),
                ".",
            ],
            "packaging the rule-framework stand-in",
        )
    stand_in = Module(RULE_FRAMEWORK, "org.opensearch.rule.RuleFrameworkPlugin", jars=())
    _describe(folder, stand_in, release)


def _describe(folder: Path, module: Module, release: Release) -> None:
    properties = {
        "description": f"{module.name}, assembled by opensearch-rerank-sidecar",
        "version": release.version,
        "name": module.name,
        "classname": module.classname,
        "java.version": str(release.min_java),
        "opensearch.version": release.version,
        "custom.foldername": "",
        "extended.plugins": ",".join(module.extended_plugins),
        "has.native.controller": "false",
    }
    (folder / "plugin-descriptor.properties").write_text(
        "".join(f"{key}={value}\n" for key, value in properties.items())
    )
    if module.permissions:
        grants = "".join(f"  permission {permission};\n" for permission in module.permissions)
        (folder / "plugin-security.policy").write_text(f"grant {{\n{grants}}};\n")


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _run(argv: list[str], step: str) -> None:
    completed = subprocess.run(argv, capture_output=True, text=True)
    if completed.returncode != 0:
        raise ModuleError(f"{step} failed:\n{(completed.stdout + completed.stderr)[-2000:]}")
