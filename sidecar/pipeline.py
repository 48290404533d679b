"""The two stages in order: embed → retrieve and fuse → rerank → normalize, with per-stage timings,
provenance carried from the first stage to every final hit, and the fail-open policy."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cachetools import LRUCache

from sidecar.config import Settings, Truncation
from sidecar.embedding import EncoderPool
from sidecar.logging import log_stage
from sidecar.metrics import Metrics
from sidecar.rerank.batcher import BatcherClosed, Overloaded
from sidecar.rerank.final_scorer import LearnedScorer, feature_rows, signals_of
from sidecar.rerank.remote.scorer import TierUnavailable
from sidecar.rerank.reranker import RerankDocument, Reranker
from sidecar.retrieval.discovery import ProfileResolver
from sidecar.retrieval.first_stage import FirstStage, FirstStageQuery, Fusion, retrieve
from sidecar.retrieval.fusion import Candidate
from sidecar.retrieval.identity import fingerprint
from sidecar.retrieval.opensearch import Upstream
from sidecar.retrieval.profiles import IndexProfile, check_filter, read_text
from sidecar.retrieval.queries import Filter
from sidecar.retrieval.transport import UpstreamError
from sidecar.scoring import best_first, minmax_first_stage, rerank_order

T = TypeVar("T")
log = logging.getLogger(__name__)


class DeadlineExceeded(Exception):
    """The request's time budget ran out in `stage`, before there was anything to return."""

    def __init__(self, stage: str) -> None:
        super().__init__(f"deadline exceeded in {stage}")
        self.stage = stage


async def within(deadline: float, stage: str, work: Coroutine[Any, Any, T], metrics: Metrics) -> T:
    """`work`, given what is left of the request's budget (`deadline`, on the loop's clock).

    Raises DeadlineExceeded (counted by stage) when it cannot finish in time."""
    remaining_s = deadline - asyncio.get_running_loop().time()
    if remaining_s <= 0:
        work.close()
    else:
        try:
            return await asyncio.wait_for(work, remaining_s)
        except TimeoutError:
            pass
    metrics.deadline_exceeded.labels(stage).inc()
    raise DeadlineExceeded(stage)


class RerankUnavailable(Exception):
    """Reranking could not be done and the operator chose fail-closed; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"reranking unavailable: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class SearchRequest:
    index: str
    query: str
    k: int
    candidates: int
    fusion: Fusion
    rerank: bool
    truncation: Truncation
    # Rerank only the first `rerank_depth` candidates; the rest follow in first-stage order.
    # None: all of them.
    rerank_depth: int | None = None
    weights: tuple[float, float] | None = None
    filter: Filter | None = None
    explain: bool = False
    # False: score every pair afresh (benchmarks measuring rerank cost); results are still cached.
    rerank_cache: bool = True
    # What the reranker reads; None: the index profile's document fields.
    document_fields: tuple[str, ...] | None = None
    # The caller's identity headers for the upstream calls (UpstreamIdentity.for_caller).
    caller_headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RerankReport:
    applied: bool
    model: str
    device: str
    dtype: str
    cache_hits: int = 0
    pairs_scored: int = 0
    fail_open: bool = False
    reason: str | None = None
    # Candidates whose rerank text was empty: not scored, kept below the reranked hits.
    empty_text: int = 0
    # Candidates past the rerank depth: not scored, kept in first-stage order below the reranked.
    below_depth: int = 0


@dataclass(frozen=True)
class RankedHit:
    candidate: Candidate
    # 1-based position in the first stage's fused order.
    first_stage_rank: int
    # The cross-encoder's raw logit; None when reranking was not applied.
    rerank_score: float | None
    # Final score in [0, 1]; see README "Scores".
    score: float
    # The first-stage score min-max normalized over all candidates, in [0, 1].
    first_stage_normalized: float
    # Reranking ran but this candidate had no text to read: it keeps its first-stage order
    # below every reranked hit, with score 0.
    empty_text: bool = False
    # Past the request's rerank depth: not scored, in first-stage order below the reranked hits,
    # its score the first-stage normalized score scaled below the lowest reranked score.
    below_depth: bool = False


@dataclass
class Timings:
    """Milliseconds per stage for the response (a stage that did not run stays 0), each also
    observed in the stage-duration histogram."""

    metrics: Metrics
    values_ms: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("embed", "retrieve", "rerank", "normalize", "total"), 0.0
        )
    )

    def record(self, stage: str, started: float) -> float:
        elapsed_s = time.perf_counter() - started
        self.values_ms[stage] = round(elapsed_s * 1000, 3)
        self.metrics.stage_duration.labels(stage).observe(elapsed_s)
        return elapsed_s


@dataclass(frozen=True)
class SearchResult:
    hits: list[RankedHit]
    candidates: list[Candidate]
    rerank: RerankReport
    timings: Timings
    retrieved: FirstStage
    profile: IndexProfile


class SearchPipeline:
    def __init__(
        self,
        settings: Settings,
        encoders: EncoderPool,
        profiles: ProfileResolver,
        upstream: Upstream,
        reranker: Reranker,
        embed_executor: ThreadPoolExecutor,
        metrics: Metrics,
        final_scorer: LearnedScorer | None = None,
        caller_cache_key: bytes | None = None,
    ) -> None:
        self._settings = settings
        # Each caller's scores are cached apart, under an HMAC of their identity headers with
        # this key (so no caller learns from the cache what another searched); None: one cache.
        self._caller_cache_key = caller_cache_key
        # Replaces the blend for reranked candidates (the model's serving.json); None: the blend.
        self._final_scorer = final_scorer
        self.metrics = metrics
        self.encoders = encoders
        self.profiles = profiles
        self._upstream = upstream
        self._reranker = reranker
        self._embed_executor = embed_executor
        self._query_vectors: LRUCache[tuple[str, str], list[float]] = LRUCache(
            maxsize=settings.query_cache_entries
        )

    @property
    def cached_query_vectors(self) -> int:
        return len(self._query_vectors)

    async def search(self, request: SearchRequest, deadline: float) -> SearchResult:
        """Both stages for the native API. `deadline` is on the event loop's clock.

        Raises ProfileError (the index's profile cannot serve this request), UpstreamError,
        Overloaded (admission bound) and RerankUnavailable (fail-closed).
        """
        timings = Timings(self.metrics)
        started = time.perf_counter()
        if request.rerank:
            # Refused before any work: a 429 costs neither an embedding nor a search.
            self.check_admission(request.candidates)
        profile = await within(
            deadline,
            "retrieve",
            self.profiles.resolve(request.index, request.caller_headers),
            self.metrics,
        )
        if request.filter is not None:
            check_filter(profile, request.index, request.filter)
        vector = None
        if profile.embedding == "local":
            stage = time.perf_counter()
            vector, cached = await within(
                deadline, "embed", self.embed_query(request.query, profile.model), self.metrics
            )
            log_stage("embed", timings.record("embed", stage), cached=cached)
        stage = time.perf_counter()
        first_stage = FirstStageQuery(
            index=request.index,
            profile=profile,
            text=request.query,
            vector=vector,
            candidates=request.candidates,
            fusion=request.fusion,
            weights=request.weights,
            filter=request.filter,
            headers=request.caller_headers,
        )
        try:
            retrieved = await within(
                deadline, "retrieve", retrieve(self._upstream, first_stage), self.metrics
            )
        except UpstreamError as error:
            if error.status == 400:
                # Refused by the cluster: the mapping the profile was built from may be stale.
                self.profiles.invalidate(request.index)
            raise
        candidates = retrieved.candidates
        if retrieved.fusion_fallback is not None:
            self.metrics.fusion_fallback.labels(retrieved.fusion_fallback).inc()
        log_stage(
            "retrieve",
            timings.record("retrieve", stage),
            fusion=request.fusion,
            fusion_fallback=retrieved.fusion_fallback,
            profile=profile.name,
            vector=profile.embedding,
            candidates=len(candidates),
            both=sum(c.provenance == "both" for c in candidates),
        )
        document_fields = request.document_fields or profile.document_fields
        hits, report = await self.rerank(
            request.query,
            candidates,
            # Only what the model reads; with reranking off nothing reads them.
            [read_text(c.source, document_fields, profile.max_chars_per_field) for c in candidates]
            if request.rerank
            else [],
            request.k,
            request.rerank,
            request.truncation,
            deadline,
            timings,
            read_cache=request.rerank_cache,
            depth=request.rerank_depth,
            caller=request.caller_headers,
        )
        log_stage("total", timings.record("total", started), hits=len(hits))
        top = hits[: self._settings.provenance_top_k]
        self.metrics.observe_provenance(
            [c.provenance for c in candidates],
            [
                (h.candidate.provenance, h.first_stage_rank, h.first_stage_normalized, final_rank)
                for final_rank, h in enumerate(top, start=1)
            ],
        )
        return SearchResult(
            hits=hits,
            candidates=candidates,
            rerank=report,
            timings=timings,
            retrieved=retrieved,
            profile=profile,
        )

    def check_admission(self, candidates: int) -> None:
        """Raises Overloaded when the reranker would refuse `candidates` pairs now."""
        self._reranker.check_admission(candidates)

    async def rerank(
        self,
        query: str,
        candidates: Sequence[Candidate],
        texts: Sequence[str],
        k: int,
        enabled: bool,
        truncation: Truncation,
        deadline: float,
        timings: Timings,
        read_cache: bool = True,
        depth: int | None = None,
        caller: Mapping[str, str] | None = None,
    ) -> tuple[list[RankedHit], RerankReport]:
        """Stage 2 and normalization over first-stage `candidates` (best first), reading `texts`
        (one per candidate; read only when `enabled`); top `k` returned.

        Shared by the native API and the `_search` interception. Only the first `depth`
        candidates are reranked (None: all): deeper reranking costs in proportion and gains ever
        less, so the rest follow in first-stage order. A candidate whose text is empty is never
        scored (an empty text would get an arbitrary score): it stays below the others in
        first-stage order, flagged and counted. Falls open to the first-stage order (flagged in
        the report) unless the operator chose fail-closed.
        """
        backend = self._reranker.backend
        report = RerankReport(
            applied=False, model=backend.model_name, device=backend.device, dtype=backend.dtype
        )
        logits: list[float | None] | None = None
        if enabled and candidates:
            stage = time.perf_counter()
            within_depth = len(candidates) if depth is None else min(depth, len(candidates))
            readable = [i for i, text in enumerate(texts[:within_depth]) if text.strip()]
            documents = [RerankDocument(candidates[i].key, texts[i]) for i in readable]
            empty_text = sum(not text.strip() for text in texts)
            below_depth = sum(bool(text.strip()) for text in texts[within_depth:])
            self.metrics.rerank_empty_text.inc(empty_text)
            reason = None
            try:
                remaining_s = deadline - asyncio.get_running_loop().time()
                if remaining_s <= 0:
                    raise TimeoutError
                # A caller with no identity headers is who every anonymous caller is.
                partition = (
                    fingerprint(self._caller_cache_key, caller)
                    if self._caller_cache_key is not None and caller
                    else ""
                )
                scores = await asyncio.wait_for(
                    self._reranker.score(
                        query, documents, truncation, read_cache=read_cache, partition=partition
                    ),
                    remaining_s,
                )
                logits = [None] * len(candidates)
                for position, logit in zip(readable, scores.logits, strict=True):
                    logits[position] = logit
                report = RerankReport(
                    applied=True,
                    model=backend.model_name,
                    device=backend.device,
                    dtype=backend.dtype,
                    cache_hits=scores.cache_hits,
                    pairs_scored=scores.pairs_scored,
                    empty_text=empty_text,
                    below_depth=below_depth,
                )
            except Overloaded:
                raise
            except TimeoutError:
                reason = "deadline"
            except BatcherClosed:
                reason = "shutting_down"
            except TierUnavailable as error:
                log.warning("rerank tier unavailable: %s", error)
                reason = error.reason
            except Exception:
                log.exception("reranking failed")
                reason = "model_error"
            duration_s = timings.record("rerank", stage)
            if reason is not None:
                if self._settings.fail_mode == "closed":
                    raise RerankUnavailable(reason)
                self.metrics.fail_open.labels(reason).inc()
                report = RerankReport(
                    applied=False,
                    model=backend.model_name,
                    device=backend.device,
                    dtype=backend.dtype,
                    fail_open=True,
                    reason=reason,
                )
            log_stage(
                "rerank",
                duration_s,
                documents=len(documents),
                cache_hits=report.cache_hits,
                pairs_scored=report.pairs_scored,
                empty_text=empty_text,
                below_depth=below_depth,
                fail_open=report.fail_open,
                reason=report.reason,
            )
        stage = time.perf_counter()
        hits = self._final_order(candidates, texts, logits)[:k]
        log_stage("normalize", timings.record("normalize", stage), hits=len(hits))
        return hits, report

    def _final_order(
        self,
        candidates: Sequence[Candidate],
        texts: Sequence[str],
        logits: Sequence[float | None] | None,
    ) -> list[RankedHit]:
        """Reranked hits by final score (the blend, or the model's learned final scorer), then
        those past the depth in first-stage order, then those with no text (score 0); scores
        never increase down the list."""
        first_stage = minmax_first_stage([c.fused_score for c in candidates])
        if logits is None:
            return [
                RankedHit(candidate, rank, None, score, score)
                for rank, (candidate, score) in enumerate(
                    zip(candidates, first_stage, strict=True), 1
                )
            ]
        scored = [i for i, logit in enumerate(logits) if logit is not None]
        scored_logits = [logits[i] or 0.0 for i in scored]
        if self._final_scorer is None:
            order = rerank_order(
                scored_logits,
                [first_stage[i] for i in scored],
                self._settings.normalization,
                self._settings.blend_alpha(),
            )
        else:
            signals = [signals_of(c, text) for c, text in zip(candidates, texts, strict=True)]
            order = best_first(
                self._final_scorer.score(feature_rows(signals, scored, scored_logits))
            )
        reranked = [
            RankedHit(
                candidates[scored[j]],
                scored[j] + 1,
                logits[scored[j]],
                score,
                first_stage[scored[j]],
            )
            for j, score in order
        ]
        lowest = min((score for _, score in order), default=1.0)
        unscored = [i for i, logit in enumerate(logits) if logit is None]
        below_depth = [
            RankedHit(
                candidates[i],
                i + 1,
                None,
                lowest * first_stage[i],
                first_stage[i],
                below_depth=True,
            )
            for i in unscored
            if texts[i].strip()
        ]
        unread = [
            RankedHit(candidates[i], i + 1, None, 0.0, first_stage[i], empty_text=True)
            for i in unscored
            if not texts[i].strip()
        ]
        return reranked + below_depth + unread

    async def embed_query(self, text: str, model: str | None) -> tuple[list[float], bool]:
        """The query's vector from bi-encoder `model` (None: the default), and whether it came
        from the cache. Runs the model on the embedding executor."""
        encoder = self.encoders.get(model)
        # The text exactly as sent: a cased bi-encoder embeds "Apple" and "apple" apart.
        key = (encoder.model_name, text)
        if (vector := self._query_vectors.get(key)) is not None:
            return vector, True
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(self._embed_executor, encoder.embed, [text])
        self._query_vectors[key] = vectors[0]
        return vectors[0], False
