"""TLS towards the cluster: the real node behind an HTTPS front with a certificate from a test CA.
Without the CA bundle the sidecar refuses the certificate with a clear error; with it, searches
and the pass-through work."""

from __future__ import annotations

import gc
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.embedding import BiEncoder
from tests.certificates import Certificates, make_certificates
from tests.integration.conftest import Cluster
from tests.integration.sidecar_server import running_sidecar
from tests.integration.test_identity import RecordingProxy
from tests.integration.test_sidecar import QUERY, post

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def https_node(opensearch: Cluster, certificates: Certificates) -> Iterator[str]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificates.server_cert, certificates.server_key)
    front = RecordingProxy(opensearch.url, context)
    yield front.url
    front.stop()


# A refused handshake leaves aiohttp's socket object to the garbage collector, which reports it
# as unclosed; it is collected here, inside this test, rather than in whichever test runs next.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_untrusted_certificate_is_refused_with_a_clear_error(
    https_node: str, encoder: BiEncoder, tiny_cross_encoder: Path, pydoc_index: str
) -> None:
    with running_sidecar(https_node, tiny_cross_encoder, encoder) as server:
        status, answer, _ = post(
            f"{server.url}/v1/search", {"index": pydoc_index, "query": QUERY, "rerank": False}
        )
        assert status == 502, answer
        assert answer["error"]["type"] == "upstream_tls_error"
        assert "SIDECAR_UPSTREAM_CA_CERTS" in answer["error"]["reason"]
        status, answer, _ = post(f"{server.url}/{pydoc_index}/_count", {})
        assert status == 502, answer
        assert answer["error"]["type"] == "upstream_tls_error"
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(f"{server.url}/readyz", timeout=30)
        assert not_ready.value.code == 503
    gc.collect()


def test_the_ca_bundle_makes_the_cluster_trusted(
    https_node: str,
    certificates: Certificates,
    encoder: BiEncoder,
    tiny_cross_encoder: Path,
    pydoc_index: str,
) -> None:
    with running_sidecar(
        https_node, tiny_cross_encoder, encoder, upstream_ca_certs=certificates.ca
    ) as server:
        status, answer, _ = post(
            f"{server.url}/v1/search",
            {"index": pydoc_index, "query": QUERY, "k": 3, "candidates": 10, "rerank": False},
        )
        assert status == 200, answer
        assert len(answer["hits"]) == 3
        status, counted, _ = post(f"{server.url}/{pydoc_index}/_count", {})
        assert status == 200
        assert counted["count"] > 0
        with urllib.request.urlopen(f"{server.url}/readyz", timeout=30) as ready:
            assert ready.status == 200


def test_the_sidecar_serves_https_itself_with_a_certificate_and_key(
    opensearch: Cluster,
    certificates: Certificates,
    encoder: BiEncoder,
    tiny_cross_encoder: Path,
    pydoc_index: str,
) -> None:
    with running_sidecar(
        opensearch.url,
        tiny_cross_encoder,
        encoder,
        listen_tls_cert=certificates.server_cert,
        listen_tls_key=certificates.server_key,
    ) as server:
        assert server.url.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(certificates.ca))
        with urllib.request.urlopen(f"{server.url}/readyz", timeout=30, context=trusted) as ready:
            assert ready.status == 200
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(f"{server.url}/readyz", timeout=30)
        plain = server.url.replace("https://", "http://")
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"{plain}/readyz", timeout=30)
    gc.collect()
