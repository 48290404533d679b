"""What the SigV4 signer adds to a request (its validity is checked against a verifying front in
tests/integration/test_sigv4.py)."""

from __future__ import annotations

import hashlib

from botocore.credentials import Credentials

from sidecar.retrieval.sigv4 import SigV4Signer

SIGNER = SigV4Signer("eu-west-1", "aoss", Credentials("AKID", "secret", "session-token"))


def test_only_signature_headers_are_added_and_the_body_hash_is_signed() -> None:
    body = b'{"query": {"match_all": {}}}'
    added = SIGNER(
        "POST",
        "https://example.eu-west-1.aoss.amazonaws.com/docs/_search?q=a b",
        body,
        {"Content-Type": "application/json", "X-Caller": "kept out of the signature"},
    )
    assert set(added) == {
        "Authorization",
        "X-Amz-Date",
        "X-Amz-Content-SHA256",
        "X-Amz-Security-Token",
    }
    assert added["X-Amz-Content-SHA256"] == hashlib.sha256(body).hexdigest()
    assert added["X-Amz-Security-Token"] == "session-token"
    credential, signed, _ = added["Authorization"].split(", ")
    assert credential.startswith("AWS4-HMAC-SHA256 Credential=AKID/")
    assert credential.endswith("/eu-west-1/aoss/aws4_request")
    assert signed == (
        "SignedHeaders=content-type;host;x-amz-content-sha256;x-amz-date;x-amz-security-token"
    )


def test_the_sync_clients_bytes_method_and_an_empty_body_are_signed_alike() -> None:
    url = "https://example.eu-west-1.aoss.amazonaws.com/"
    assert SIGNER(b"GET", url)["X-Amz-Content-SHA256"] == hashlib.sha256(b"").hexdigest()
