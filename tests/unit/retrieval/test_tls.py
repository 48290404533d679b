"""The TLS client context from the settings: trust store or CA bundle, mutual TLS, verification."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import pytest

from sidecar.retrieval.tls import TlsError, client_context, server_context
from tests.certificates import make_certificates

URL = "https://127.0.0.1:9200"


def test_http_clusters_get_no_context() -> None:
    assert client_context("http://127.0.0.1:9200") is None


def test_https_verifies_certificates_and_hostnames_by_default() -> None:
    context = client_context(URL)
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True


def test_a_ca_bundle_replaces_the_system_trust_store(tmp_path: Path) -> None:
    certificates = make_certificates(tmp_path)
    context = client_context(URL, ca_certs=certificates.ca)
    assert context is not None
    assert [c["subject"] for c in context.get_ca_certs()] == [
        ((("commonName", "sidecar test CA"),),)
    ]


def test_mutual_tls_loads_the_client_certificate_and_key(tmp_path: Path) -> None:
    certificates = make_certificates(tmp_path)
    context = client_context(
        URL,
        ca_certs=certificates.ca,
        client_cert=certificates.client_cert,
        client_key=certificates.client_key,
    )
    assert context is not None
    with pytest.raises(TlsError, match="not a usable certificate and key"):
        client_context(
            URL, client_cert=certificates.client_cert, client_key=certificates.server_key
        )


def test_unreadable_files_name_their_setting(tmp_path: Path) -> None:
    with pytest.raises(TlsError, match=r"SIDECAR_UPSTREAM_CA_CERTS: cannot read"):
        client_context(URL, ca_certs=tmp_path / "missing.pem")
    with pytest.raises(TlsError, match=r"SIDECAR_UPSTREAM_CLIENT_CERT: cannot read"):
        client_context(URL, client_cert=tmp_path / "missing.pem")


def test_turning_verification_off_is_explicit_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sidecar.retrieval.tls"):
        context = client_context(URL, verify=False)
    assert context is not None
    assert context.verify_mode == ssl.CERT_NONE
    assert "TLS verification towards OpenSearch is OFF" in caplog.text


def test_the_listener_serves_its_certificate_and_refuses_a_mismatched_key(tmp_path: Path) -> None:
    certificates = make_certificates(tmp_path)
    context = server_context(certificates.server_cert, certificates.server_key)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    with pytest.raises(TlsError, match="SIDECAR_LISTEN_TLS_CERT/_KEY"):
        server_context(certificates.server_cert, certificates.client_key)
    with pytest.raises(TlsError, match=r"SIDECAR_LISTEN_TLS_KEY: cannot read"):
        server_context(certificates.server_cert, tmp_path / "missing.pem")
