"""Whose identity each upstream call carries. Calls made for a caller carry the caller's own
allowlisted headers (`forward`) or the sidecar's service credentials for everyone (`service`); the
sidecar's own calls (readiness, mapping discovery) carry its service credentials, else none.
Headers that could impersonate another user never pass from a caller unless allowlisted."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from multidict import CIMultiDict

IdentityMode = Literal["forward", "service"]

# The security plugin's impersonation header, and the trusted-proxy authenticator's headers
# (x-proxy-user, x-proxy-roles, x-proxy-ext-*): from an untrusted caller, a way to become
# someone else.
_IMPERSONATION_HEADER = "opendistro_security_impersonate_as"
_PROXY_HEADER_PREFIX = "x-proxy-"


@dataclass(frozen=True)
class UpstreamIdentity:
    mode: IdentityMode
    # Lower-case names of the caller headers forwarded in `forward` mode.
    forward_headers: frozenset[str]
    # `Authorization` value of the sidecar's own credentials, if any. Never logged.
    service_authorization: str | None = None

    @classmethod
    def build(
        cls,
        mode: IdentityMode,
        forward_headers: Iterable[str],
        username: str | None = None,
        password: str | None = None,
    ) -> UpstreamIdentity:
        """Raises ValueError for `service` mode without credentials, or a password without a
        user name."""
        authorization = None
        if username is not None:
            token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
            authorization = f"Basic {token}"
        elif password is not None:
            raise ValueError("a service password needs a service user name")
        if mode == "service" and authorization is None:
            raise ValueError("service mode needs the sidecar's own credentials")
        return cls(mode, frozenset(h.strip().lower() for h in forward_headers), authorization)

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
