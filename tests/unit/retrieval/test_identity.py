"""UpstreamIdentity: which of a caller's headers go upstream, and the sidecar's own credentials."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from sidecar.retrieval.identity import UpstreamIdentity

CALLER = {
    "Authorization": "Basic Y2FsbGVyOnB3",
    "SecurityTenant": "global",
    "opendistro_security_impersonate_as": "admin",
    "x-proxy-user": "admin",
    "Content-Type": "application/json",
}


def test_forward_sends_only_the_allowlisted_headers() -> None:
    identity = UpstreamIdentity.build("forward", ["Authorization", "securitytenant"])
    assert identity.for_caller(CALLER) == {
        "authorization": "Basic Y2FsbGVyOnB3",
        "securitytenant": "global",
    }
    assert identity.own() == {}, "no service account: the sidecar's own calls carry nothing"


def test_forward_without_caller_credentials_sends_none() -> None:
    identity = UpstreamIdentity.build("forward", ["authorization"], "sidecar", "pw")
    assert identity.for_caller({"Content-Type": "application/json"}) == {}
    assert identity.own() == {"authorization": "Basic c2lkZWNhcjpwdw=="}


def test_service_mode_sends_the_sidecars_credentials_for_everyone() -> None:
    identity = UpstreamIdentity.build("service", ["authorization"], "sidecar", "pw")
    assert identity.for_caller(CALLER) == {"authorization": "Basic c2lkZWNhcjpwdw=="}


@pytest.mark.parametrize(
    ("mode", "username", "password", "message"),
    [
        ("service", None, None, "service mode needs"),
        ("forward", None, "pw", "needs a service user name"),
    ],
)
def test_identity_settings_that_cannot_work_are_refused(
    mode: str, username: str | None, password: str | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        UpstreamIdentity.build(mode, ["authorization"], username, password)  # type: ignore[arg-type]


def test_a_sigv4_signer_is_the_service_identity_and_adds_no_fixed_header() -> None:
    def signer(*_: object) -> dict[str, str]:
        return {"Authorization": "AWS4-HMAC-SHA256 ..."}

    identity = UpstreamIdentity.build("service", ["authorization"], signer=signer)
    assert identity.for_caller(CALLER) == {}, "the signature is made per request"
    assert identity.own() == {}
    assert "Authorization" not in identity.pass_through(CIMultiDict(CALLER))
    with pytest.raises(ValueError, match="needs service mode and no basic credentials"):
        UpstreamIdentity.build("service", ["authorization"], "sidecar", "pw", signer)
    with pytest.raises(ValueError, match="needs service mode"):
        UpstreamIdentity.build("forward", ["authorization"], signer=signer)
