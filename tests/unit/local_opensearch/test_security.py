"""The secured node's generated admin password and how it is stored."""

import stat
import string
from pathlib import Path

from sidecar.local_opensearch.security import generate_password, write_password


def test_passwords_have_every_character_class_the_plugin_demands() -> None:
    passwords = {generate_password() for _ in range(50)}
    assert len(passwords) == 50
    for password in passwords:
        assert len(password) >= 20
        for group in (string.ascii_lowercase, string.ascii_uppercase, string.digits, "-_."):
            assert any(c in group for c in password), (password, group)


def test_the_password_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "admin-password"
    path.write_text("old")
    path.chmod(0o644)
    write_password(path, "s3cret-Password")
    assert path.read_text() == "s3cret-Password\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
