"""The security plugin's demo configuration for the secured local node: certificates, users, admin password.

The plugin's own installer (`install_demo_configuration.sh -y -i -s`) writes the demo
certificates and appends its settings to `opensearch.yml`; those settings are kept apart in
`config/security-demo.yml` so the node's own configuration can be rewritten on every start.
The admin password is generated once and stored with mode 0600 beside the install.
"""

from __future__ import annotations

import os
import secrets
import ssl
import string
import subprocess
from collections.abc import Mapping
from pathlib import Path

ADMIN_USER = "admin"
DEMO_SECTION = "security-demo.yml"
ROOT_CA = "root-ca.pem"
_INSTALLER = Path("plugins") / "opensearch-security" / "tools" / "install_demo_configuration.sh"
# The plugin refuses weak initial passwords: every character class, and long.
_PASSWORD_CLASSES = (string.ascii_lowercase, string.ascii_uppercase, string.digits, "-_.")


class SecurityError(RuntimeError):
    """The demo security configuration could not be installed; the message has the installer's output."""


def generate_password() -> str:
    alphabet = "".join(_PASSWORD_CLASSES)
    password = [secrets.choice(group) for group in _PASSWORD_CLASSES]
    password += [secrets.choice(alphabet) for _ in range(20)]
    secrets.SystemRandom().shuffle(password)
    return "".join(password)


def write_password(path: Path, password: str) -> None:
    """Create the password file readable by its owner only (never world-readable, not even briefly)."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(password + "\n")


def install_demo(install: Path, password: str, environ: Mapping[str, str]) -> None:
    """Run the plugin's demo installer on a fresh install and keep the settings it appends."""
    config = install / "config" / "opensearch.yml"
    config.write_text("")
    env = {**environ, "OPENSEARCH_INITIAL_ADMIN_PASSWORD": password}
    completed = subprocess.run(
        ["bash", str(install / _INSTALLER), "-y", "-i", "-s"],
        env=env,
        capture_output=True,
        text=True,
    )
    if completed.returncode != 0:
        raise SecurityError(
            "the security plugin's demo installer failed:\n"
            + (completed.stdout + completed.stderr)[-2000:]
        )
    (install / "config" / DEMO_SECTION).write_text(config.read_text())


def https_context(install: Path) -> ssl.SSLContext:
    """Verifies the node against the demo root CA (its certificate names 127.0.0.1 and localhost)."""
    return ssl.create_default_context(cafile=str(install / "config" / ROOT_CA))
