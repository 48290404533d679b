import socket
from pathlib import Path

import pytest

from sidecar.config import LocalNodeSettings
from sidecar.local_opensearch.node import LocalNode, NodeError


def test_port_taken_by_another_process_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        node = LocalNode(LocalNodeSettings(port=port, home=tmp_path), tmp_path / "cache", {})
        with pytest.raises(NodeError, match=f"port {port} is in use"):
            node.up()


def test_status_of_a_node_never_started(tmp_path: Path) -> None:
    node = LocalNode(LocalNodeSettings(port=9299, home=tmp_path), tmp_path / "cache", {})
    status = node.status()
    assert not status.running
    assert not status.healthy
    assert status.version is None
    assert node.down() is False


def test_stale_pid_file_is_not_mistaken_for_a_running_node(tmp_path: Path) -> None:
    node = LocalNode(LocalNodeSettings(port=9299, home=tmp_path), tmp_path / "cache", {})
    node.home.mkdir(parents=True)
    (node.home / "opensearch.pid").write_text("1\n")  # pid 1 exists but is not OpenSearch
    assert not node.status().running


def test_purge_removes_a_stopped_nodes_home_and_keeps_the_downloads(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    node = LocalNode(LocalNodeSettings(port=9299, home=tmp_path / "nodes"), cache, {})
    (node.home / "opensearch-3.6.0" / "bin").mkdir(parents=True)
    (node.home / "data").mkdir()
    (node.home / "node.json").write_text("{}")
    assert node.purge() is True
    assert not node.home.exists()
    assert (cache / "downloads").is_dir()
    assert node.purge() is False


def test_purge_refuses_a_folder_that_is_not_a_nodes_home(tmp_path: Path) -> None:
    node = LocalNode(LocalNodeSettings(port=9299, home=tmp_path), tmp_path / "cache", {})
    (node.home / "notes").mkdir(parents=True)
    with pytest.raises(NodeError, match="not removing it"):
        node.purge()
    assert (node.home / "notes").is_dir()
