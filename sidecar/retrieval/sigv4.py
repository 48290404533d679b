"""SigV4 signing with the sidecar's own AWS identity, for `service` mode in front of Amazon
OpenSearch Service (`es`) or OpenSearch Serverless (`aoss`).

A body-rewriting proxy cannot reuse a caller's signature: it covers the path, query and body
that the sidecar changes, and expires after five minutes. So in this mode the sidecar signs every
call itself, as its own role. Credentials come from botocore's default chain (environment,
~/.aws, IRSA web identity, container or instance role), which also refreshes them. A refresh
may call STS or the instance metadata service and block: requests are signed with the
credentials last read, and `keep_fresh` reads them again on an executor, never on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

# What a signature adds to a request; nothing else of the request is changed.
_SIGNATURE_HEADERS = frozenset(
    {"authorization", "x-amz-date", "x-amz-content-sha256", "x-amz-security-token"}
)
# SigV4 encodes every byte but the RFC 3986 unreserved characters (so a space is %20, never +).
_UNRESERVED = "-_.~"
# How often the credentials are read again; botocore renews them within 15 minutes of expiry.
REFRESH_INTERVAL_S = 60.0

log = logging.getLogger(__name__)


class SigV4Signer:
    """Callable as opensearch-py's `http_auth` (method, url, body, headers → headers to add),
    and by the pass-through for each forwarded request."""

    def __init__(self, region: str, service: str, credentials: Any = None) -> None:
        """Raises ValueError when botocore is missing or finds no credentials."""
        try:
            import botocore.session
        except ImportError:
            raise ValueError(
                "SigV4 signing needs botocore: pip install 'opensearch-rerank-sidecar[aws]'"
            ) from None
        if credentials is None:
            credentials = botocore.session.get_session().get_credentials()
        if credentials is None:
            raise ValueError(
                "no AWS credentials found (environment, ~/.aws, web identity, container or "
                "instance role)"
            )
        self.region = region
        self.service = service
        self._credentials = credentials
        # What requests are signed with; frozen, so a refresh between reading the key id and
        # the secret cannot mix two identities. Read here (at start) and by `refresh`.
        self._frozen = credentials.get_frozen_credentials()

    def refresh(self) -> None:
        """Read the credentials again (blocking when botocore renews them: off the loop)."""
        self._frozen = self._credentials.get_frozen_credentials()

    def __call__(
        self,
        method: str | bytes,
        url: str,
        body: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """The signature headers for one request. Signed: method, path, query, host, the
        content type and the body's hash (also sent, as AWS Serverless requires). opensearch-py's
        sync client passes the method as bytes."""
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        verb = method.decode() if isinstance(method, bytes) else method
        payload = body.encode() if isinstance(body, str) else body or b""
        request = AWSRequest(
            method=verb,
            url=_canonical_url(url),
            data=payload,
            headers={
                name: value
                for name, value in (headers or {}).items()
                if name.lower() == "content-type"
            },
        )
        request.headers["X-Amz-Content-SHA256"] = hashlib.sha256(payload).hexdigest()
        SigV4Auth(self._frozen, self.service, self.region).add_auth(request)
        return {
            name: value
            for name, value in request.headers.items()
            if name.lower() in _SIGNATURE_HEADERS
        }


async def keep_fresh(signer: SigV4Signer, interval_s: float = REFRESH_INTERVAL_S) -> None:
    """Until cancelled: every `interval_s`, the signer's credentials read again on the default
    executor. A failed read is logged and the last credentials stay in use (botocore raises only
    once they cannot be renewed at all)."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval_s)
        try:
            await loop.run_in_executor(None, signer.refresh)
        except Exception:
            log.exception("AWS credentials could not be refreshed; signing with the last ones")


def _canonical_url(url: str) -> str:
    """`url` with its query in SigV4's canonical encoding (botocore signs the query as given;
    the cluster decodes what was sent and re-encodes it so)."""
    parts = urlsplit(url)
    query = "&".join(
        f"{quote(key, safe=_UNRESERVED)}={quote(value, safe=_UNRESERVED)}"
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", query, ""))
