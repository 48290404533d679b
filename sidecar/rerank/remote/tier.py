"""The remote rerank tier as the reranker sees it: a backend that prepares one pair per document
(the server cuts each at its model's length) and a scorer that sends the pairs over HTTP.

The sidecar still owns everything around the model: which text a document gives (the profile's
fields and `max_chars`), caching, deadlines, fail-open, normalization and provenance. The score
cache is namespaced by `identity` (protocol, server, model), so moving to another tier or model
never serves stale scores.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Sequence
from typing import Any

import aiohttp

from sidecar import jsonio
from sidecar.config import RemoteReranker, Settings, Truncation
from sidecar.metrics import Metrics
from sidecar.rerank.backend import ScoringPair
from sidecar.rerank.remote.apis import DEFAULTS, Call, RerankApi
from sidecar.rerank.remote.scorer import Answer, RemoteScorer, TierLimits

# A rough token count for a text (what the micro-batcher would size batches by; the tier
# batches by pairs).
_CHARS_PER_TOKEN = 4


class RemoteBackend:
    """What the reranker asks of a backend, for a model that runs on a rerank server."""

    device = "remote"
    # The server's own: the sidecar does not know it (0 in the cache namespace).
    max_length = 0

    def __init__(self, kind: RemoteReranker, url: str, model: str) -> None:
        self.model_name = model
        self.dtype: str = kind
        self.identity = f"{kind}:{url.rstrip('/')}:{model}"

    def prepare(
        self,
        query: str,
        texts: Sequence[str],
        truncation: Truncation,
        overlap_tokens: int,
        passage_tokens: int | None = None,
    ) -> list[list[ScoringPair]]:
        """One pair per document, as read: the server cuts it at its model's length (`first`;
        the settings refuse the other modes with a remote tier)."""
        return [[ScoringPair(query, text, len(text) // _CHARS_PER_TOKEN + 1)] for text in texts]


class HttpTier:
    """One aiohttp session to the rerank server: JSON in and out, the API key as a bearer token
    (never logged: the headers are built here and nowhere else)."""

    def __init__(
        self, url: str, api_key: str | None, ssl_context: ssl.SSLContext | None, read_s: float
    ) -> None:
        self._url = url.rstrip("/")
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=read_s)
        self._session: aiohttp.ClientSession | None = None

    async def send(self, call: Call) -> Answer:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, connector=aiohttp.TCPConnector(ssl=self._ssl)
            )
        async with self._session.request(
            call.method,
            self._url + call.path,
            data=jsonio.dumps(call.body),
            headers=self._headers,
            allow_redirects=False,
        ) as answer:
            payload = await answer.read()
            body: Any
            try:
                body = json.loads(payload) if payload else None
            except ValueError:  # not JSON (UnicodeDecodeError is one too)
                body = None
            return Answer(answer.status, dict(answer.headers), body)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def remote_stage_two(
    settings: Settings, kind: RemoteReranker, metrics: Metrics
) -> tuple[RemoteBackend, RemoteScorer, HttpTier]:
    """The backend, scorer and connection for SIDECAR_RERANKER_BACKEND=`kind`. Raises
    SettingsError when the API key file cannot be read."""
    assert settings.reranker_url is not None  # the settings require it for a remote backend
    default_batch, default_scores = DEFAULTS[kind]
    api = RerankApi(
        kind,
        settings.reranker_model,
        settings.reranker_max_batch or default_batch,
        settings.reranker_scores or default_scores,
    )
    tier = HttpTier(
        settings.reranker_url,
        settings.reranker_api_key_value(),
        None,
        settings.request_timeout_s,
    )
    limits = TierLimits(
        concurrency=settings.reranker_concurrency,
        max_retry_wait_s=settings.reranker_retry_wait_s,
        failure_threshold=settings.reranker_breaker_failures,
        open_s=settings.reranker_breaker_open_s,
    )
    backend = RemoteBackend(kind, settings.reranker_url, settings.reranker_model)
    return backend, RemoteScorer(api, tier.send, limits, metrics), tier
