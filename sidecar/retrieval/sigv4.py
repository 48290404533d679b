"""SigV4 signing with the sidecar's own AWS identity, for `service` mode in front of Amazon
OpenSearch Service (`es`) or OpenSearch Serverless (`aoss`).

A body-rewriting proxy cannot reuse a caller's signature: it covers the path, query and body
that the sidecar changes, and expires after five minutes. So in this mode the sidecar signs every
call itself, as its own role. Credentials come from botocore's default chain (environment,
~/.aws, IRSA web identity, container or instance role), which also refreshes them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

# What a signature adds to a request; nothing else of the request is changed.
_SIGNATURE_HEADERS = frozenset(
    {"authorization", "x-amz-date", "x-amz-content-sha256", "x-amz-security-token"}
)
# SigV4 encodes every byte but the RFC 3986 unreserved characters (so a space is %20, never +).
_UNRESERVED = "-_.~"


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
        # Frozen: a refresh between reading the key id and the secret would mix two identities.
        frozen = self._credentials.get_frozen_credentials()
        SigV4Auth(frozen, self.service, self.region).add_auth(request)
        return {
            name: value
            for name, value in request.headers.items()
            if name.lower() in _SIGNATURE_HEADERS
        }


def _canonical_url(url: str) -> str:
    """`url` with its query in SigV4's canonical encoding (botocore signs the query as given;
    the cluster decodes what was sent and re-encodes it so)."""
    parts = urlsplit(url)
    query = "&".join(
        f"{quote(key, safe=_UNRESERVED)}={quote(value, safe=_UNRESERVED)}"
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", query, ""))
