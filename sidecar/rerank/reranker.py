"""Stage 2: score (query, document) pairs with the cross-encoder — cache first, then the batcher.

Owns the score cache and the micro-batcher (both touched only from the event loop). Tokenizing
runs on its own executor thread so it never waits behind a model call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sidecar.config import Truncation
from sidecar.metrics import Metrics
from sidecar.rerank.backend import RerankBackend, ScoringPair
from sidecar.rerank.batcher import MicroBatcher
from sidecar.rerank.cache import ScoreCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RerankDocument:
    id: str
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
        backend: RerankBackend,
        batcher: MicroBatcher[ScoringPair],
        cache: ScoreCache,
        prepare_executor: ThreadPoolExecutor,
        metrics: Metrics,
        *,
        overlap_tokens: int,
    ) -> None:
        self.backend = backend
        self._metrics = metrics
        self._batcher = batcher
        self._cache = cache
        self._prepare_executor = prepare_executor
        self._overlap_tokens = overlap_tokens

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
    ) -> RerankScores:
        """Logits for every document. Cached scores are reused; the rest go through the batcher.

        Raises Overloaded (admission bound), BatcherClosed, or whatever the model raised. Callers
        bound the wait with their deadline; cancelling releases the queued pairs.
        """
        namespace = f"{self.backend.identity}|{truncation}"
        keys = [ScoreCache.key(namespace, query, doc.id, doc.text) for doc in documents]
        logits: list[float | None] = (
            self._cache.get_many(keys) if read_cache else [None] * len(keys)
        )
        missing = [i for i, logit in enumerate(logits) if logit is None]
        self._metrics.cache_requests.labels("hit").inc(len(documents) - len(missing))
        self._metrics.cache_requests.labels("miss").inc(len(missing))
        pairs_scored = 0
        if missing:
            prepared = await asyncio.get_running_loop().run_in_executor(
                self._prepare_executor,
                self.backend.prepare,
                query,
                [documents[i].text for i in missing],
                truncation,
                self._overlap_tokens,
            )
            flat = [(pair, pair.token_length) for pairs in prepared for pair in pairs]
            pair_scores = await self._batcher.submit(flat)
            pairs_scored = len(flat)
            offset = 0
            fresh: list[float] = []
            for pairs in prepared:
                fresh.append(max(pair_scores[offset : offset + len(pairs)]))
                offset += len(pairs)
            for index, logit in zip(missing, fresh, strict=True):
                logits[index] = logit
            self._cache.put_many([keys[i] for i in missing], fresh)
        return RerankScores(
            logits=[float(logit) for logit in logits if logit is not None],
            cache_hits=len(documents) - len(missing),
            pairs_scored=pairs_scored,
        )
