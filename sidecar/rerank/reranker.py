"""Stage 2: score (query, document) pairs with the cross-encoder — caches first (in-process, then
the shared one when configured), then the batcher.

Owns the score caches and the micro-batcher (all touched only from the event loop). Tokenizing
runs on its own executor thread so it never waits behind a model call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sidecar.config import Truncation
from sidecar.documents import DocKey
from sidecar.metrics import Metrics
from sidecar.rerank.backend import PairPreparer, ScoringPair
from sidecar.rerank.cache import CacheKey, ScoreCache

if TYPE_CHECKING:  # the shared cache needs the optional `redis` package
    from sidecar.rerank.shared_cache import SharedScoreCache

log = logging.getLogger(__name__)


class PairScorer(Protocol):
    """What scores prepared pairs: the in-process micro-batcher, or a remote tier's scorer."""

    @property
    def running(self) -> bool: ...

    @property
    def pending_pairs(self) -> int: ...

    def check_admission(self, pairs: int) -> None: ...

    async def submit(self, items: Sequence[tuple[ScoringPair, int]]) -> list[float]: ...


@dataclass(frozen=True)
class RerankDocument:
    key: DocKey
    text: str


@dataclass(frozen=True)
class RerankScores:
    """Raw cross-encoder logits, one per document in request order (max over chunks)."""

    logits: list[float]
    cache_hits: int
    pairs_scored: int


class Reranker:
    def __init__(
        self,
        backend: PairPreparer,
        batcher: PairScorer,
        cache: ScoreCache,
        prepare_executor: ThreadPoolExecutor,
        metrics: Metrics,
        *,
        overlap_tokens: int,
        passage_tokens: int | None = None,
        shared_cache: SharedScoreCache | None = None,
    ) -> None:
        self.backend = backend
        self._metrics = metrics
        self._batcher = batcher
        self._cache = cache
        self._shared_cache = shared_cache
        self._prepare_executor = prepare_executor
        self._overlap_tokens = overlap_tokens
        self._passage_tokens = passage_tokens

    def check_admission(self, documents: int) -> None:
        """Raises Overloaded when `documents` more pairs (one each: an estimate, before cache hits
        and chunks are known) would not be admitted now."""
        self._batcher.check_admission(documents)

    async def score(
        self,
        query: str,
        documents: Sequence[RerankDocument],
        truncation: Truncation,
        *,
        read_cache: bool = True,
        partition: str = "",
    ) -> RerankScores:
        """Logits for every document. Cached scores are reused; the rest go through the batcher.
        `partition`: scores are cached apart for each (e.g. each caller), and only read back
        within it.

        Raises Overloaded (admission bound), BatcherClosed, or whatever the model raised. Callers
        bound the wait with their deadline; cancelling releases the queued pairs.
        """
        namespace = f"{self._cache_namespace(truncation)}|partition={partition}"
        keys = [ScoreCache.key(namespace, query, doc.key, doc.text) for doc in documents]
        logits: list[float | None] = (
            await self._cached_logits(keys) if read_cache else [None] * len(keys)
        )
        missing = [i for i, logit in enumerate(logits) if logit is None]
        self._metrics.cache_requests.labels("hit").inc(len(documents) - len(missing))
        self._metrics.cache_requests.labels("miss").inc(len(missing))
        pairs_scored = 0
        if missing:
            fresh, pairs_scored = await self._model_logits(
                query, [documents[i].text for i in missing], truncation
            )
            for index, logit in zip(missing, fresh, strict=True):
                logits[index] = logit
            self._store([keys[i] for i in missing], fresh)
        return RerankScores(
            logits=[float(logit) for logit in logits if logit is not None],
            cache_hits=len(documents) - len(missing),
            pairs_scored=pairs_scored,
        )

    def _cache_namespace(self, truncation: Truncation) -> str:
        """The model and everything that decides which tokens it sees: replicas sharing a Redis
        but started with another max length or chunking never read each other's scores."""
        return (
            f"{self.backend.identity}|{truncation}|max_length={self.backend.max_length}"
            f"|overlap={self._overlap_tokens}|passage={self._passage_tokens}"
        )

    async def _cached_logits(self, keys: Sequence[CacheKey]) -> list[float | None]:
        """From the local cache; what it lacks from the shared one, copied into the local one."""
        logits = self._cache.get_many(keys)
        local_misses = [i for i, logit in enumerate(logits) if logit is None]
        if self._shared_cache is None or not local_misses:
            return logits
        shared = await self._shared_cache.get_many([keys[i] for i in local_misses])
        found = [
            (i, logit) for i, logit in zip(local_misses, shared, strict=True) if logit is not None
        ]
        for index, logit in found:
            logits[index] = logit
        self._cache.put_many([keys[i] for i, _ in found], [logit for _, logit in found])
        return logits

    async def _model_logits(
        self, query: str, texts: Sequence[str], truncation: Truncation
    ) -> tuple[list[float], int]:
        """Each text's logit (the best of its chunks) and the number of pairs the model scored."""
        prepared = await asyncio.get_running_loop().run_in_executor(
            self._prepare_executor,
            self.backend.prepare,
            query,
            texts,
            truncation,
            self._overlap_tokens,
            self._passage_tokens,
        )
        flat = [(pair, pair.token_length) for pairs in prepared for pair in pairs]
        pair_scores = await self._batcher.submit(flat)
        logits: list[float] = []
        offset = 0
        for pairs in prepared:
            logits.append(max(pair_scores[offset : offset + len(pairs)]))
            offset += len(pairs)
        return logits, len(flat)

    def _store(self, keys: Sequence[CacheKey], logits: Sequence[float]) -> None:
        self._cache.put_many(keys, logits)
        if self._shared_cache is not None:
            self._shared_cache.put_many_behind(keys, logits)
