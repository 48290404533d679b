"""Reranker orchestration with a fake backend: chunk maxima, cache use, and what reaches the batcher."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import CollectorRegistry

from sidecar.config import Truncation
from sidecar.documents import DocKey
from sidecar.metrics import Metrics
from sidecar.rerank.backend import ScoringPair
from sidecar.rerank.batcher import BatchLimits, MicroBatcher
from sidecar.rerank.cache import ScoreCache
from sidecar.rerank.reranker import RerankDocument, Reranker, RerankScores


class FakeBackend:
    """Scores a pair by how often the query's first word occurs in it; `max_chunk` splits on '|'."""

    identity = "fake@1"
    model_name = "fake"
    device = "cpu"
    dtype = "float32"
    max_length = 512

    def __init__(self) -> None:
        self.scored: list[str] = []

    def prepare(
        self,
        query: str,
        texts: Sequence[str],
        truncation: Truncation,
        overlap_tokens: int,
        passage_tokens: int | None = None,
    ) -> list[list[ScoringPair]]:
        split = (lambda t: t.split("|")) if truncation == "max_chunk" else (lambda t: [t])
        return [
            [ScoringPair(query, part, len(part.split())) for part in split(text)] for text in texts
        ]

    def score(self, pairs: Sequence[ScoringPair]) -> list[float]:
        self.scored.extend(pair.text for pair in pairs)
        return [float(pair.text.split().count(pair.query.split()[0])) for pair in pairs]


def rerank(
    backend: FakeBackend,
    cache: ScoreCache,
    executor: ThreadPoolExecutor,
    query: str,
    documents: list[RerankDocument],
    truncation: Truncation,
    *,
    overlap_tokens: int = 0,
    passage_tokens: int | None = None,
    partition: str = "",
) -> RerankScores:
    """One Reranker.score call with a fresh batcher around the shared backend and cache."""

    async def run() -> RerankScores:
        batcher: MicroBatcher[ScoringPair] = MicroBatcher(backend.score, BatchLimits(), executor)
        await batcher.start()
        try:
            reranker = Reranker(
                backend,
                batcher,
                cache,
                executor,
                Metrics(CollectorRegistry()),
                overlap_tokens=overlap_tokens,
                passage_tokens=passage_tokens,
            )
            return await reranker.score(query, documents, truncation, partition=partition)
        finally:
            await batcher.stop()

    return asyncio.run(run())


def test_document_score_is_the_best_chunk_and_scores_keep_document_order() -> None:
    backend = FakeBackend()
    with ThreadPoolExecutor(1) as executor:
        documents = [
            RerankDocument(DocKey("docs", "a"), "x | cat cat | x"),
            RerankDocument(DocKey("docs", "b"), "cat"),
            RerankDocument(DocKey("docs", "c"), "dog"),
        ]
        result = rerank(backend, ScoreCache(100, 60.0), executor, "cat", documents, "max_chunk")
    assert result.logits == [2.0, 1.0, 0.0]
    assert result.pairs_scored == 5
    assert result.cache_hits == 0


def test_cached_documents_skip_the_model_and_truncation_modes_do_not_share_scores() -> None:
    backend = FakeBackend()
    cache = ScoreCache(100, 60.0)
    documents = [
        RerankDocument(DocKey("docs", "a"), "cat | cat cat"),
        RerankDocument(DocKey("docs", "b"), "cat dog"),
    ]
    with ThreadPoolExecutor(1) as executor:
        first = rerank(backend, cache, executor, "cat", documents, "first")
        scored_once = len(backend.scored)
        again = rerank(backend, cache, executor, "cat", documents, "first")
        assert len(backend.scored) == scored_once, "the repeat must not reach the model"
        chunked = rerank(backend, cache, executor, "cat", documents, "max_chunk")
    assert again.logits == first.logits
    assert again.cache_hits == 2
    assert chunked.cache_hits == 0
    assert chunked.logits == [2.0, 1.0]


def test_a_query_differing_only_in_case_is_scored_again() -> None:
    # A cased cross-encoder (XLM-R based) may score "Cat" and "cat" differently.
    backend = FakeBackend()
    cache = ScoreCache(100, 60.0)
    documents = [RerankDocument(DocKey("docs", "a"), "cat cat")]
    with ThreadPoolExecutor(1) as executor:
        rerank(backend, cache, executor, "cat", documents, "first")
        variant = rerank(backend, cache, executor, "Cat", documents, "first")
    assert (variant.cache_hits, variant.pairs_scored) == (0, 1)


@pytest.mark.parametrize(
    ("setting", "value"),
    [("max_length", 256), ("overlap_tokens", 32), ("passage_tokens", 64)],
)
def test_scores_made_under_other_truncation_settings_are_not_reused(
    setting: str, value: int
) -> None:
    # Replicas restarted with another SIDECAR_RERANKER_MAX_LENGTH (or chunking) share one Redis.
    documents = [RerankDocument(DocKey("docs", "a"), "cat | cat cat")]
    cache = ScoreCache(100, 60.0)
    with ThreadPoolExecutor(1) as executor:
        rerank(FakeBackend(), cache, executor, "cat", documents, "best_passage")
        backend = FakeBackend()
        options: dict[str, int] = {}
        if setting == "max_length":
            backend.max_length = value
        else:
            options[setting] = value
        other = rerank(backend, cache, executor, "cat", documents, "best_passage", **options)
    assert (other.cache_hits, other.pairs_scored) == (0, 1)


def test_cache_reads_can_be_skipped_while_scores_are_still_stored() -> None:
    backend = FakeBackend()
    cache = ScoreCache(100, 60.0)
    documents = [RerankDocument(DocKey("docs", "a"), "cat cat")]
    with ThreadPoolExecutor(1) as executor:

        async def run() -> tuple[RerankScores, RerankScores]:
            batcher: MicroBatcher[ScoringPair] = MicroBatcher(
                backend.score, BatchLimits(), executor
            )
            await batcher.start()
            try:
                reranker = Reranker(
                    backend,
                    batcher,
                    cache,
                    executor,
                    Metrics(CollectorRegistry()),
                    overlap_tokens=0,
                )
                await reranker.score("cat", documents, "first")
                fresh = await reranker.score("cat", documents, "first", read_cache=False)
                cached = await reranker.score("cat", documents, "first")
                return fresh, cached
            finally:
                await batcher.stop()

        fresh, cached = asyncio.run(run())
    assert (fresh.pairs_scored, fresh.cache_hits) == (1, 0)
    assert (cached.pairs_scored, cached.cache_hits) == (0, 1)


def test_a_partition_reads_back_only_its_own_scores() -> None:
    """Callers kept apart: what one caller's search put in the cache is no hit for another."""
    backend = FakeBackend()
    cache = ScoreCache(100, 60.0)
    documents = [RerankDocument(DocKey("docs", "a"), "cat cat")]
    with ThreadPoolExecutor(1) as executor:
        first = rerank(backend, cache, executor, "cat", documents, "first", partition="alice")
        other = rerank(backend, cache, executor, "cat", documents, "first", partition="bob")
        again = rerank(backend, cache, executor, "cat", documents, "first", partition="alice")
    assert (first.cache_hits, other.cache_hits, again.cache_hits) == (0, 0, 1)
    assert first.logits == other.logits == again.logits
