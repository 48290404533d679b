"""What the SigV4 signer adds to a request (its validity is checked against a verifying front in
tests/integration/test_sigv4.py)."""

from __future__ import annotations

import asyncio
import hashlib
import threading

from botocore.credentials import Credentials, ReadOnlyCredentials

from sidecar.retrieval.sigv4 import SigV4Signer, keep_fresh

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


class RenewingCredentials:
    """botocore's refreshable credentials, as the signer sees them: each read may renew them
    (blocking, in botocore), and says on which thread it ran."""

    def __init__(self) -> None:
        self.reads: list[str] = []
        self.renewed = threading.Event()

    def get_frozen_credentials(self) -> ReadOnlyCredentials:
        self.reads.append(threading.current_thread().name)
        if len(self.reads) > 1:
            self.renewed.set()
        return ReadOnlyCredentials(f"AKID{len(self.reads)}", "secret", None)


def test_signing_never_reads_the_credentials_and_keep_fresh_renews_them_off_the_loop() -> None:
    credentials = RenewingCredentials()
    signer = SigV4Signer("eu-west-1", "es", credentials)
    url = "https://search.eu-west-1.es.amazonaws.com/_search"

    async def scenario() -> str:
        loop_thread = threading.current_thread().name
        assert [signer("GET", url) for _ in range(50)]
        assert len(credentials.reads) == 1, "read once, at start: never per request"
        refresher = asyncio.create_task(keep_fresh(signer, interval_s=0.01))
        try:
            renewed = await asyncio.get_running_loop().run_in_executor(
                None, credentials.renewed.wait, 5.0
            )
        finally:
            refresher.cancel()
        assert renewed
        assert loop_thread not in credentials.reads[1:], "renewed on an executor thread"
        return signer("GET", url)["Authorization"]

    authorization = asyncio.run(scenario())
    assert "Credential=AKID1/" not in authorization, "signed with the renewed credentials"
