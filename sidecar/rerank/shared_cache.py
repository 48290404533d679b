"""The second score cache level, in a Redis that all replicas share: the reranker asks it for what
its in-process cache missed (one MGET per request) and hands it fresh scores to write behind the
answer. An outage costs a search at most one timeout; then Redis is left alone for a back-off."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from sidecar.config import mask_credentials
from sidecar.metrics import Metrics
from sidecar.rerank.cache import CacheKey

log = logging.getLogger(__name__)

# v1: the value format below; bump it when that changes, so old and new replicas never mix.
KEY_PREFIX = "sidecar:score:v1:"
# How long Redis is skipped after a failed call: long enough that a dead Redis costs a timeout
# about once per back-off (not once per search), short enough that shared hits resume soon after
# it is back.
OUTAGE_BACKOFF_S = 2.0
# What a broken, unreachable or slow Redis raises (TimeoutError: our own per-call bound).
OUTAGE_ERRORS = (RedisError, OSError, TimeoutError)


def shared_key(key: CacheKey) -> str:
    """The Redis key of a local cache key. Hashed: query text never lands in Redis and keys stay
    short however long the query; the model identity is inside, so models never share entries."""
    digest = hashlib.blake2b(json.dumps(key).encode(), digest_size=16).hexdigest()
    return KEY_PREFIX + digest


def encode_score(score: float) -> bytes:
    """repr: the shortest text that reads back as exactly the same float."""
    return repr(score).encode("ascii")


def decode_score(raw: bytes | str | None) -> float | None:
    """None for a missing entry or one this version cannot read (treated as a miss)."""
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        return None


class Backoff:
    """After a failure, calls are skipped for `backoff_s`; the first call after that tries again.
    `failed` and `succeeded` return True when they change the state (an outage begins or ends)."""

    def __init__(self, backoff_s: float, timer: Callable[[], float] = time.monotonic) -> None:
        self._backoff_s = backoff_s
        self._timer = timer
        self._retry_at_s: float | None = None

    def allows_call(self) -> bool:
        return self._retry_at_s is None or self._timer() >= self._retry_at_s

    def failed(self) -> bool:
        began = self._retry_at_s is None
        self._retry_at_s = self._timer() + self._backoff_s
        return began

    def succeeded(self) -> bool:
        ended = self._retry_at_s is not None
        self._retry_at_s = None
        return ended


class SharedScoreCache:
    """Scores in Redis under `shared_key`, each kept `ttl_s`. Never raises on a Redis problem:
    lookups then miss and writes are dropped, both counted. Used from the event loop only."""

    def __init__(self, url: str, *, ttl_s: float, timeout_s: float, metrics: Metrics) -> None:
        """Connects lazily (nothing happens here). Raises ValueError when `url` cannot be parsed."""
        # One attempt plus one on a fresh connection (a pooled one may predate a Redis restart);
        # the default, ten with back-off, would outlast any per-call timeout.
        self._client = Redis.from_url(
            url,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), retries=1),
        )
        self._address = mask_credentials(url)
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._timeout_s = timeout_s
        self._metrics = metrics
        self._backoff = Backoff(OUTAGE_BACKOFF_S)
        self._writes: set[asyncio.Task[None]] = set()

    async def get_many(self, keys: Sequence[CacheKey]) -> list[float | None]:
        """The stored score of each key, or None (missing, or Redis unavailable)."""
        requests = self._metrics.shared_cache_requests
        if not self._backoff.allows_call():
            requests.labels("skipped").inc(len(keys))
            return [None] * len(keys)
        started_s = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s):
                raw = await self._client.mget([shared_key(key) for key in keys])
        except OUTAGE_ERRORS as error:
            self._failed(error)
            requests.labels("error").inc(len(keys))
            return [None] * len(keys)
        finally:
            self._metrics.shared_cache_duration.labels("get").observe(
                time.perf_counter() - started_s
            )
        self._succeeded()
        scores = [decode_score(value) for value in raw]
        found = sum(score is not None for score in scores)
        requests.labels("hit").inc(found)
        requests.labels("miss").inc(len(keys) - found)
        return scores

    def put_many_behind(self, keys: Sequence[CacheKey], scores: Sequence[float]) -> None:
        """Starts writing the scores and returns at once: the answer never waits for Redis."""
        if not self._backoff.allows_call():
            self._metrics.shared_cache_writes.labels("skipped").inc(len(keys))
            return
        entries = [
            (shared_key(key), encode_score(score)) for key, score in zip(keys, scores, strict=True)
        ]
        task = asyncio.create_task(self._put_many(entries))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _put_many(self, entries: Sequence[tuple[str, bytes]]) -> None:
        started_s = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._client.pipeline(transaction=False) as pipeline:
                    for key, value in entries:
                        pipeline.set(key, value, px=self._ttl_ms)
                    await pipeline.execute()
        except OUTAGE_ERRORS as error:
            self._failed(error)
            self._metrics.shared_cache_writes.labels("error").inc(len(entries))
            return
        finally:
            self._metrics.shared_cache_duration.labels("set").observe(
                time.perf_counter() - started_s
            )
        self._succeeded()
        self._metrics.shared_cache_writes.labels("stored").inc(len(entries))

    async def close(self) -> None:
        """Lets the writes in flight finish (each is bounded by the timeout), then disconnects."""
        await asyncio.gather(*self._writes, return_exceptions=True)
        await self._client.aclose()

    def _failed(self, error: BaseException) -> None:
        # The error's type only: its text is Redis's or the socket's, and none of it is needed.
        if self._backoff.failed():
            log.warning(
                "shared score cache unavailable: local cache only, retrying after the back-off",
                extra={
                    "address": self._address,
                    "error": type(error).__name__,
                    "backoff_s": OUTAGE_BACKOFF_S,
                },
            )

    def _succeeded(self) -> None:
        if self._backoff.succeeded():
            log.info("shared score cache available again", extra={"address": self._address})
