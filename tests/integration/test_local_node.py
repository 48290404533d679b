"""The project-managed node itself: idempotent up, status, and what it reports."""

import pytest

from tests.integration.conftest import Cluster

pytestmark = pytest.mark.integration


def test_up_on_a_running_node_changes_nothing(opensearch: Cluster) -> None:
    if opensearch.local_node is None:
        pytest.skip(
            "the cluster under test is not the project-managed node (OPENSEARCH_URL or Docker)"
        )
    before = opensearch.local_node.status()
    after = opensearch.local_node.up()
    assert before.healthy
    assert after.healthy
    assert after.pid == before.pid
    assert after.version == opensearch.client.info()["version"]["number"]
    assert after.faiss_available in {True, False}
