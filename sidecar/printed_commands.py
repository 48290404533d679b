"""How the offline commands spell the `sidecar` command lines they print for the user to run
next: the very script that is running, and paths as they would be typed from here."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def sidecar_command() -> list[str]:
    """How to run this very `sidecar` again from the current folder: the script beside the
    interpreter (`.venv/bin/sidecar` from a checkout: it is not on the PATH), else the module."""
    script = Path(sys.executable).parent / "sidecar"  # not resolved: the venv's python is a link
    if not script.is_file():
        return [sys.executable, "-m", "sidecar"]
    return [shown_path(script)]


def shown_path(path: Path) -> str:
    """`path` as typed from the current folder: relative when that is short, else absolute."""
    relative = os.path.relpath(path.absolute())
    return relative if not relative.startswith("../..") else str(path.absolute())
