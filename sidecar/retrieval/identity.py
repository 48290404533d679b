"""Whose identity each upstream call carries. Calls made for a caller carry the caller's own
allowlisted headers (`forward`) or the sidecar's service credentials for everyone (`service`); the
sidecar's own calls (readiness, mapping discovery) carry its service credentials, else none.
Headers that could impersonate another user never pass from a caller unless allowlisted.

The service credentials are basic auth, or a SigV4 signer (the sidecar's AWS role): a signature
is per request, so the signer is applied where each request is sent, not as a header here."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from multidict import CIMultiDict

IdentityMode = Literal["forward", "service"]

# The security plugin's impersonation header, and the trusted-proxy authenticator's headers
# (x-proxy-user, x-proxy-roles, x-proxy-ext-*): from an untrusted caller, a way to become
# someone else.
_IMPERSONATION_HEADER = "opendistro_security_impersonate_as"
_PROXY_HEADER_PREFIX = "x-proxy-"

# (method, url, body, headers) → the signature headers to add; see sigv4.SigV4Signer.
Signer = Callable[[str, str, bytes | None, Mapping[str, str] | None], dict[str, str]]


def fingerprint(key: bytes, headers: Mapping[str, str]) -> str:
    """Who a caller is, as a cache may key it: an HMAC of their identity headers under `key`, so
    a cache never holds a credential, nor anything to guess one from without the key."""
    material = "\n".join(f"{k.lower()}:{v}" for k, v in sorted(headers.items())).encode()
    return hmac.new(key, material, hashlib.sha256).hexdigest()


def basic_authorization(username: str, password: str) -> str:
    """The `Authorization` value of HTTP basic auth."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


@dataclass(frozen=True)
class UpstreamIdentity:
    mode: IdentityMode
    # Lower-case names of the caller headers forwarded in `forward` mode.
    forward_headers: frozenset[str]
    # `Authorization` value of the sidecar's own credentials, if any. Never logged.
    service_authorization: str | None = None
    # Signs every request with the sidecar's AWS identity (service mode only).
    signer: Signer | None = None

    @classmethod
    def build(
        cls,
        mode: IdentityMode,
        forward_headers: Iterable[str],
        username: str | None = None,
        password: str | None = None,
        signer: Signer | None = None,
    ) -> UpstreamIdentity:
        """Raises ValueError for `service` mode without credentials, a password without a user
        name, or a signer outside `service` mode or beside basic credentials."""
        authorization = None
        if username is not None:
            authorization = basic_authorization(username, password or "")
        elif password is not None:
            raise ValueError("a service password needs a service user name")
        if signer is not None and (mode != "service" or authorization is not None):
            raise ValueError(
                "SigV4 signing is the service identity: it needs service mode and no basic "
                "credentials (a request cannot carry both)"
            )
        if mode == "service" and authorization is None and signer is None:
            raise ValueError("service mode needs the sidecar's own credentials")
        forwarded = frozenset(h.strip().lower() for h in forward_headers)
        return cls(mode, forwarded, authorization, signer)

    def for_caller(self, headers: Mapping[str, str]) -> dict[str, str]:
        """The identity headers for an upstream call made on behalf of a caller who sent
        `headers`: their allowlisted ones (forward), or the service credentials (service)."""
        if self.mode == "service":
            return self.own()
        return {
            name.lower(): value
            for name, value in headers.items()
            if name.lower() in self.forward_headers
        }

    def own(self) -> dict[str, str]:
        """The identity headers of the sidecar's own calls."""
        if self.service_authorization is None:
            return {}
        return {"authorization": self.service_authorization}

    def pass_through(self, headers: CIMultiDict[str]) -> CIMultiDict[str]:
        """A caller's end-to-end headers as the pass-through sends them: impersonation headers
        removed unless allowlisted; in `service` mode the caller's identity headers replaced by
        the service credentials."""
        kept: CIMultiDict[str] = CIMultiDict()
        for name, value in headers.items():
            lowered = name.lower()
            if self.mode == "service" and (
                lowered == "authorization" or lowered in self.forward_headers
            ):
                continue
            if self._impersonates(lowered) and lowered not in self.forward_headers:
                continue
            kept.add(name, value)
        if self.mode == "service":
            kept.update(self.own())
        return kept

    @staticmethod
    def _impersonates(lowered: str) -> bool:
        return lowered == _IMPERSONATION_HEADER or lowered.startswith(_PROXY_HEADER_PREFIX)
