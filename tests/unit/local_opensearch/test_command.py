"""`sidecar opensearch up|down|status --version`: the option reaches the node's settings."""

import pytest

from sidecar.cli import _build_parser, main


@pytest.mark.parametrize("action", ["up", "down", "status"])
def test_every_opensearch_action_takes_a_version(action: str) -> None:
    parser = _build_parser()
    args = parser.parse_args(["opensearch", action, "--version", "2.19.1"])
    assert args.opensearch_version == "2.19.1"
    assert parser.parse_args(["opensearch", action]).opensearch_version is None


def test_a_malformed_version_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["opensearch", "status", "--port", "9299", "--version", "latest"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "got 'latest'" in err
