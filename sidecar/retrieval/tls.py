"""TLS towards the cluster: one client context, built once from the settings, used by both upstream
clients (the first stage's and the pass-through's). Verification is on unless the operator turns
it off explicitly, which is logged at start. Also the server context of the sidecar's own
listener, when it serves HTTPS itself."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

log = logging.getLogger(__name__)


class TlsError(ValueError):
    """A TLS file cannot be used; the message names the file and the setting."""


def client_context(
    url: str,
    *,
    ca_certs: Path | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    verify: bool = True,
) -> ssl.SSLContext | None:
    """The context for an `https` cluster (None for `http`): the system trust store, or only the
    CA bundle `ca_certs` when given; the client certificate and key for mutual TLS; hostname
    and certificate verification unless `verify` is false.

    Raises TlsError for a file that cannot be read or does not hold what it should."""
    if not url.startswith("https://"):
        return None
    context = ssl.create_default_context()
    if ca_certs is not None:
        context = ssl.create_default_context(
            cafile=_readable(ca_certs, "SIDECAR_UPSTREAM_CA_CERTS")
        )
    if client_cert is not None:
        try:
            context.load_cert_chain(
                _readable(client_cert, "SIDECAR_UPSTREAM_CLIENT_CERT"),
                _readable(client_key, "SIDECAR_UPSTREAM_CLIENT_KEY") if client_key else None,
            )
        except ssl.SSLError as error:
            raise TlsError(
                f"SIDECAR_UPSTREAM_CLIENT_CERT/_KEY: {client_cert} with {client_key} is not a "
                f"usable certificate and key ({error.reason})"
            ) from None
    if not verify:
        log.warning(
            "TLS verification towards OpenSearch is OFF (SIDECAR_UPSTREAM_VERIFY_CERTS=false): "
            "any server can pose as the cluster"
        )
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """HTTPS for the sidecar's listener: TLS 1.2 or newer with Python's default server ciphers.

    Raises TlsError for a file that cannot be read or a certificate that does not match its key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(
            _readable(cert, "SIDECAR_LISTEN_TLS_CERT"), _readable(key, "SIDECAR_LISTEN_TLS_KEY")
        )
    except ssl.SSLError as error:
        raise TlsError(
            f"SIDECAR_LISTEN_TLS_CERT/_KEY: {cert} with {key} is not a usable certificate and "
            f"key ({error.reason})"
        ) from None
    return context


def _readable(path: Path, setting: str) -> str:
    try:
        with path.open("rb"):
            pass
    except OSError as error:
        raise TlsError(f"{setting}: cannot read {path}: {error.strerror}") from None
    return str(path)
