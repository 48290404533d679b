"""Every Prometheus metric the sidecar exports, defined in one place on an injected registry.

Labels come from small fixed sets only (routes, stages, sources, ranges, reasons, status codes),
never from query text, document ids or index names. Bucket boundaries (seconds unless named
otherwise) are chosen for this workload and documented beside each histogram.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from sidecar.rerank.batcher import BatchStats

# Request and stage latency: a cached, first-stage-only search takes a few ms; CPU reranking of
# 100 long candidates takes seconds; the deadline caps everything at tens of seconds.
LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
# One model call: ~1 ms for a few short pairs on a GPU up to seconds for a full CPU batch.
INFERENCE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Batch sizes in pairs, up to the largest sensible max_batch_pairs.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# One call to the shared score cache (Redis): well under a millisecond in the same zone, a few ms
# across zones; SIDECAR_SCORE_CACHE_TIMEOUT_S (0.05 by default) ends the slow ones.
SHARED_CACHE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# Padded tokens per batch: 1 short pair (~32) up to 256 pairs x 512 tokens.
BATCH_TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
# First-stage rank minus final rank: negative = demoted by the reranker, positive = promoted.
RANK_SHIFT_BUCKETS = (-100, -50, -20, -10, -5, -1, 0, 1, 5, 10, 20, 50, 100)

RANK_RANGES = ((1, 10, "1-10"), (11, 20, "11-20"), (21, 50, "21-50"), (51, 100, "51-100"))
SOURCES = ("lexical_only", "vector_only", "both")


def rank_range(rank: int) -> str:
    """The first-stage rank range label of a 1-based rank."""
    for low, high, label in RANK_RANGES:
        if low <= rank <= high:
            return label
    return "101+"


def score_range(normalized: float) -> str:
    """The tenth of [0, 1] a normalized score falls in, e.g. 0.37 -> "0.3-0.4" (1.0 -> "0.9-1.0")."""
    tenth = min(9, max(0, math.floor(normalized * 10))) if math.isfinite(normalized) else 0
    return f"{tenth / 10:.1f}-{(tenth + 1) / 10:.1f}"


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "sidecar_requests",
            "HTTP requests answered, by route and status code.",
            ["route", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "sidecar_request_duration_seconds",
            "Time to answer a request, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.inflight = Gauge(
            "sidecar_inflight_requests", "Requests being answered now.", registry=registry
        )
        self.stage_duration = Histogram(
            "sidecar_stage_duration_seconds",
            "Time spent in each search stage.",
            ["stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.candidates = Counter(
            "sidecar_candidates",
            "First-stage candidates, by which retrievers found them.",
            ["source"],
            registry=registry,
        )
        self.final_hits = Counter(
            "sidecar_final_hits",
            "Final top-k hits, by retrievers that found them and first-stage rank range.",
            ["source", "first_stage_rank"],
            registry=registry,
        )
        self.final_hits_by_score = Counter(
            "sidecar_final_hits_by_score",
            "Final top-k hits, by retrievers and range of their min-max normalized first-stage score.",
            ["source", "first_stage_score"],
            registry=registry,
        )
        self.rank_shift = Histogram(
            "sidecar_rank_shift",
            "First-stage rank minus final rank of each final top-k hit.",
            buckets=RANK_SHIFT_BUCKETS,
            registry=registry,
        )
        self.rerank_pairs = Counter(
            "sidecar_rerank_pairs", "Pairs scored by the cross-encoder.", registry=registry
        )
        self.rerank_empty_text = Counter(
            "sidecar_rerank_empty_text",
            "Candidates not reranked because their document fields held no text.",
            registry=registry,
        )
        self.write_documents = Counter(
            "sidecar_write_documents",
            "Documents written through the sidecar to an embed-on-write index, by what was done: "
            "embedded, kept (the client sent the vector, or there was no text), failed.",
            ["result"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "sidecar_rerank_batch_size",
            "Pairs per cross-encoder call.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.batch_tokens = Histogram(
            "sidecar_rerank_batch_tokens",
            "Padded tokens (longest pair x pairs) per cross-encoder call.",
            buckets=BATCH_TOKEN_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "sidecar_rerank_queue_depth", "Pairs admitted and not yet scored.", registry=registry
        )
        self.cache_entries = Gauge(
            "sidecar_cache_entries",
            "Entries held by each bounded cache (scores, query vectors, index mappings).",
            ["cache"],
            registry=registry,
        )
        # process_resident_memory_bytes & co.: what a soak watches for growth.
        ProcessCollector(registry=registry)
        self.queue_wait = Histogram(
            "sidecar_rerank_queue_wait_seconds",
            "Longest wait of a pair in a batch before its model call.",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.inference = Histogram(
            "sidecar_rerank_inference_seconds",
            "Duration of one cross-encoder call.",
            buckets=INFERENCE_BUCKETS_S,
            registry=registry,
        )
        self.cache_requests = Counter(
            "sidecar_rerank_cache_requests",
            "Score cache lookups per pair, by result: hit (in-process or shared cache), miss (scored).",
            ["result"],
            registry=registry,
        )
        self.shared_cache_requests = Counter(
            "sidecar_score_cache_shared_requests",
            "Shared (Redis) score cache lookups of what the local cache missed, per pair, by "
            "result: hit, miss, error (Redis failed or was too slow), skipped (backing off after "
            "an error).",
            ["result"],
            registry=registry,
        )
        self.shared_cache_writes = Counter(
            "sidecar_score_cache_shared_writes",
            "Fresh scores written to the shared (Redis) score cache, per pair, by result: stored, "
            "error, skipped (backing off after an error).",
            ["result"],
            registry=registry,
        )
        self.shared_cache_duration = Histogram(
            "sidecar_score_cache_shared_duration_seconds",
            "Round trips to the shared (Redis) score cache, failed ones included.",
            ["operation"],
            buckets=SHARED_CACHE_BUCKETS_S,
            registry=registry,
        )
        self.fail_open = Counter(
            "sidecar_fail_open",
            "Searches answered in first-stage order because reranking could not finish.",
            ["reason"],
            registry=registry,
        )
        self.rejected = Counter(
            "sidecar_rejected_requests",
            "Requests refused, by reason.",
            ["reason"],
            registry=registry,
        )
        self.deadline_exceeded = Counter(
            "sidecar_deadline_exceeded_total",
            "Requests whose time budget (SIDECAR_REQUEST_TIMEOUT_S) ran out before there was "
            "anything to return, by the stage that was running (answered 504)",
            ["stage"],
            registry=registry,
        )
        self.rerank_skipped = Counter(
            "sidecar_rerank_skipped_total",
            "_search requests with ext.rerank answered by the cluster unreranked, by the "
            "parameter that asked for another response shape",
            ["reason"],
            registry=registry,
        )
        self.upstream_failover = Counter(
            "sidecar_upstream_failover_total",
            "Upstream requests sent to another node after one could not be connected to, by "
            "kind (proxy, search, msearch, mapping, fetch)",
            ["kind"],
            registry=registry,
        )
        self.msearch_fallback = Counter(
            "sidecar_msearch_fallback_total",
            "First-stage _msearch calls refused with 403 and run as parallel _search calls instead",
            registry=registry,
        )
        self.fusion_fallback = Counter(
            "sidecar_fusion_fallback_total",
            "Requests whose server-side (hybrid) fusion failed and were fused client-side instead",
            ["reason"],
            registry=registry,
        )
        self.remote_requests = Counter(
            "sidecar_remote_rerank_requests_total",
            "Calls to the remote rerank tier, by backend and outcome: ok, overloaded (429/503), "
            "error (another status, or an answer of the wrong shape), unreachable, breaker_open "
            "(refused without a call)",
            ["backend", "outcome"],
            registry=registry,
        )
        self.remote_duration = Histogram(
            "sidecar_remote_rerank_duration_seconds",
            "Round trips to the remote rerank tier, by backend",
            ["backend"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.remote_batch_pairs = Histogram(
            "sidecar_remote_rerank_batch_pairs",
            "Pairs sent in one call to the remote rerank tier, by backend",
            ["backend"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.remote_breaker = Gauge(
            "sidecar_remote_rerank_breaker_state",
            "The remote rerank tier's circuit breaker: 0 closed, 1 half-open, 2 open; by backend",
            ["backend"],
            registry=registry,
        )
        self.upstream_requests = Counter(
            "sidecar_upstream_requests",
            "Requests to OpenSearch, by status code (or 'error': no answer) and node (host:port).",
            ["status", "node"],
            registry=registry,
        )
        self.upstream_ejections = Counter(
            "sidecar_upstream_ejections_total",
            "Times a node was taken out of the rotation for failing to answer (no connection, "
            "or silence until the read timeout), by node",
            ["node"],
            registry=registry,
        )
        self.upstream_node_ejected = Gauge(
            "sidecar_upstream_node_ejected",
            "1 while a node is out of the rotation, probed until it answers; by node",
            ["node"],
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "sidecar_upstream_duration_seconds",
            "OpenSearch round trips, by kind.",
            ["kind"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.build_info = Gauge(
            "sidecar_build_info",
            "Always 1; the labels say what is running.",
            ["version", "reranker", "device", "dtype", "embedding_model"],
            registry=registry,
        )
        self.reranker_serving = Gauge(
            "sidecar_reranker_serving_info",
            "Always 1; the labels say how the reranker's scores are served: the final scorer, "
            "the default rerank depth, and whether the model gained on its validation queries.",
            ["final_scorer", "rerank_depth", "validation"],
            registry=registry,
        )
        self.gpu_memory = Gauge(
            "sidecar_gpu_memory_bytes",
            "CUDA memory allocated by torch (absent without CUDA).",
            registry=registry,
        )

    def observe_batch(self, stats: BatchStats) -> None:
        """The micro-batcher's after-every-call report."""
        self.batch_size.observe(stats.pairs)
        self.batch_tokens.observe(stats.padded_tokens)
        self.queue_wait.observe(stats.queue_wait_s)
        self.inference.observe(stats.inference_s)
        if not stats.failed:
            self.rerank_pairs.inc(stats.pairs)

    def observe_provenance(
        self,
        candidate_sources: Sequence[str],
        final: Sequence[tuple[str, int, float, int]],
    ) -> None:
        """`candidate_sources`: each first-stage candidate's provenance. `final`: for each final
        top-k hit, (provenance, first-stage rank, normalized first-stage score, final rank)."""
        for source, count in collections.Counter(candidate_sources).items():
            if source in SOURCES:
                self.candidates.labels(source).inc(count)
        for source, first_rank, first_score, final_rank in final:
            if source not in SOURCES:
                continue
            self.final_hits.labels(source, rank_range(first_rank)).inc()
            self.final_hits_by_score.labels(source, score_range(first_score)).inc()
            self.rank_shift.observe(first_rank - final_rank)

    def track_gauges(
        self,
        queue_depth: Callable[[], float],
        gpu_memory: Callable[[], float] | None,
        cache_sizes: Mapping[str, Callable[[], int]],
    ) -> None:
        """Gauges read at scrape time from their owners."""
        self.queue_depth.set_function(queue_depth)
        for cache, size in cache_sizes.items():
            self.cache_entries.labels(cache).set_function(size)
        if gpu_memory is not None:
            self.gpu_memory.set_function(gpu_memory)
