"""Figures about the reranker itself for `sidecar bench`, measured in-process on one cross-encoder:
its raw ceiling, cross-request micro-batching against naive per-request `predict` calls, the score
cache warm against cold, and every dtype the hardware runs natively. Asserts nothing about time."""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry
from tqdm import tqdm

from sidecar.bench import read_queries
from sidecar.device import select_dtype
from sidecar.documents import DocKey
from sidecar.indexing.corpus import read_corpus
from sidecar.metrics import Metrics
from sidecar.rerank.backend import CrossEncoderBackend, ScoringPair
from sidecar.rerank.batcher import BatchLimits, BatchStats, MicroBatcher
from sidecar.rerank.cache import ScoreCache
from sidecar.rerank.reranker import RerankDocument, Reranker

# What most retrieve-and-rerank code passes to CrossEncoder.predict (also its default).
NAIVE_PREDICT_BATCH_SIZE = 32
# Words tried when building synthetic documents of an exact token length.
_MAX_VOCABULARY_WORDS = 4000
# Rounds of re-measuring a synthetic document whose words did not tokenize one token each.
_MAX_FIT_ROUNDS = 8
SECTIONS = ("raw", "batching", "cache", "dtypes")


def read_beir_texts(
    corpus: Path,
    queries: Path,
    *,
    max_documents: int | None = None,
    max_queries: int | None = None,
) -> tuple[list[str], list[str]]:
    """Document texts (title and text, as the reranker sees them) from a BEIR `corpus.jsonl` and
    query texts from its `queries.jsonl`, in file order. Raises CorpusError on a malformed line."""
    documents = [
        document.embedding_text for document in itertools.islice(read_corpus(corpus), max_documents)
    ]
    return documents, read_queries(queries, max_queries)


def available_dtypes(device: str) -> list[str]:
    """The dtypes worth measuring on `device`: float32 always; bfloat16 on CUDA GPUs that support
    it and on CPUs with native bf16 units (emulated bf16 is slower than float32, so not measured);
    float16 on CUDA only."""
    import torch

    if device.startswith("cuda"):
        return ["float32", *(["bfloat16"] if torch.cuda.is_bf16_supported() else []), "float16"]
    if device == "cpu" and select_dtype("auto", device) == torch.bfloat16:
        return ["float32", "bfloat16"]
    return ["float32"]


def run_model_benchmarks(
    model: str,
    texts: Sequence[str],
    queries: Sequence[str],
    *,
    device: str = "auto",
    dtype: str = "auto",
    max_length: int | None = None,
    max_batch_pairs: int = 64,
    max_batch_tokens: int = 16384,
    max_wait_s: float = 0.002,
    concurrency: int = 16,
    candidates: int = 20,
    depths: Sequence[int] = (20, 50, 100),
    lengths: Sequence[int] = (128, 256, 512),
    iterations: int = 3,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure the cross-encoder `model` (Hub id or local path) in this process; a JSON-ready dict.

    Request i of the raw, batching and cache sections pairs `queries[i % len(queries)]` with the
    next `candidates` entries of `texts` (cycled), truncated at the model's maximum length.
    Sections, each with its figures and ratios:

    - raw: `backend.score` back to back on `max_batch_pairs` pairs, `iterations` calls after one
      warm-up call: the ceiling for the micro-batcher.
    - batching: `concurrency` requests of `candidates` pairs at once, through one MicroBatcher
      (`max_batch_pairs`, `max_batch_tokens`, `max_wait_s`, one model thread) and naively (each
      request's own `CrossEncoder.predict(batch_size=32)` on its own thread). Ratios are
      micro-batched / naive; `efficiency_vs_raw` is micro-batched / raw pairs/s;
      `max_abs_score_diff` compares both approaches' logits for the same pairs.
    - cache: one request's documents scored twice through Reranker + ScoreCache; the warm run
      scores no pairs.
    - dtypes: for each of `available_dtypes` (its own backend, loaded once), each depth in
      `depths` and pair length in `lengths` (tokens, capped at the model's maximum; synthetic
      documents of exactly that length, the length used is reported): `iterations` requests of
      `depth` pairs, each scored in batches of `max_batch_pairs`, after one warm-up request.

    `dtype` is the serving dtype of the raw, batching and cache sections (float32 makes the
    batching score comparison exact to float rounding). Runs its own event loops, so it must not
    be called from a running one. Raises ValueError on empty inputs or non-positive sizes, and
    whatever loading the model raises.
    """
    if not texts or not queries:
        raise ValueError("model benchmarks need at least one document text and one query")
    sizes = {
        "max_batch_pairs": max_batch_pairs,
        "concurrency": concurrency,
        "candidates": candidates,
        "iterations": iterations,
    }
    sizes.update({f"depth {d}": d for d in depths} | {f"length {n}": n for n in lengths})
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if not depths or not lengths:
        raise ValueError("the dtype grid needs at least one depth and one length")

    backend = CrossEncoderBackend(model, device=device, dtype=dtype, max_length=max_length)
    backend.warm_up()
    requests = _request_pairs(backend, texts, queries, concurrency, candidates)
    # Enough room that the whole burst is admitted: admission is not what is measured.
    limits = BatchLimits(
        max_batch_pairs=max_batch_pairs,
        max_batch_tokens=max_batch_tokens,
        max_wait_s=max_wait_s,
        max_pending_pairs=max(BatchLimits.max_pending_pairs, concurrency * candidates),
    )
    raw = _measure_raw(backend, requests, max_batch_pairs, iterations)
    batching = _measure_batching(backend, requests, limits, raw["pairs_per_s"])
    cache = asyncio.run(_measure_cache(backend, queries[0], _cycle(texts, 0, candidates), limits))
    dtypes = available_dtypes(backend.device)
    grid = _measure_dtypes(
        backend,
        model,
        dtypes,
        _single_token_words(backend, queries[0], texts),
        queries[0],
        depths=depths,
        lengths=lengths,
        max_batch_pairs=max_batch_pairs,
        iterations=iterations,
        progress=progress,
    )
    import torch

    return {
        "model": model,
        "device": backend.device,
        # Intra-op threads per model call: on a CPU shared with other work (OpenSearch) more
        # threads than free cores slow every call down, so the figures depend on it.
        "torch_threads": torch.get_num_threads(),
        "dtype": backend.dtype,
        "max_length": backend.max_length,
        "dtypes_tested": dtypes,
        "raw": raw,
        "batching": batching,
        "cache": cache,
        "dtypes": grid,
    }


def format_model_report(result: dict[str, Any]) -> str:
    """Aligned plain-text tables of a `run_model_benchmarks` result, one block per section."""
    raw, batching, cache = result["raw"], result["batching"], result["cache"]
    micro, naive = batching["micro_batched"], batching["naive"]
    lines = [
        f"reranker {result['model']} on {result['device']} ({result['dtype']}, "
        f"{result['torch_threads']} torch threads, max length {result['max_length']} tokens); "
        f"dtypes tested: {', '.join(result['dtypes_tested'])}",
        "",
        f"raw: backend.score back to back, {raw['pairs_per_call']} pairs per call x "
        f"{raw['iterations']} calls",
        *_table(
            ("pairs/s", "ms/call", "pairs scored", "mean tokens"),
            [(raw["pairs_per_s"], raw["ms_per_call"], raw["pairs_scored"], raw["mean_tokens"])],
        ),
        "",
        f"batching: {batching['concurrency']} concurrent requests x {batching['candidates']} "
        "pairs; micro-batched (one model thread) vs naive (predict per request, one thread each)",
        *_table(
            ("approach", "wall s", "pairs", "pairs/s", "p50 ms", "p95 ms", "model calls"),
            [
                (
                    name,
                    run["wall_s"],
                    run["pairs_scored"],
                    run["pairs_per_s"],
                    run["p50_ms"],
                    run["p95_ms"],
                    run["model_calls"],
                )
                for name, run in (("micro-batched", micro), ("naive", naive))
            ],
        ),
        f"micro-batched / naive: throughput {batching['throughput_ratio']:.2f}x, p50 latency "
        f"{batching['p50_latency_ratio']:.2f}x; micro-batched / raw ceiling: "
        f"{batching['efficiency_vs_raw']:.2f}; max |score difference| "
        f"{batching['max_abs_score_diff']:.2e}",
        "",
        f"cache: {cache['documents']} documents scored twice through the reranker",
        *_table(
            ("run", "seconds", "pairs scored", "cache hits"),
            [
                ("cold", cache["cold_s"], cache["cold_pairs_scored"], cache["cold_cache_hits"]),
                ("warm", cache["warm_s"], cache["warm_pairs_scored"], cache["warm_cache_hits"]),
            ],
        ),
        f"warm / cold time: {cache['warm_over_cold']:.4f} (warm is {cache['speedup']:.0f}x faster)",
        "",
        "dtypes: one request = depth pairs of the given length, batches of "
        f"{raw['pairs_per_call']} pairs",
        *_table(
            (
                "dtype",
                "depth",
                "tokens",
                "pairs/s",
                "ms/request",
                "pairs/s vs fp32",
                "ms vs fp32",
            ),
            [
                (
                    cell["dtype"],
                    cell["depth"],
                    cell["tokens"],
                    cell["pairs_per_s"],
                    cell["ms_per_request"],
                    f"{cell['speedup_vs_float32']:.2f}x",
                    f"{cell['ms_ratio_vs_float32']:.2f}",
                )
                for cell in result["dtypes"]
            ],
        ),
    ]
    return "\n".join(lines)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Columns padded to their widest cell: text left-aligned, numbers right-aligned."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], int | float) for row in rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            value.rjust(width) if right else value.ljust(width)
            for value, width, right in zip(values, widths, numeric, strict=True)
        ).rstrip()

    return [
        "  " + line(headers),
        "  " + line(["-" * width for width in widths]),
        *("  " + line(row) for row in cells),
    ]


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def _cycle(texts: Sequence[str], start: int, count: int) -> list[str]:
    return [texts[(start + offset) % len(texts)] for offset in range(count)]


def _request_pairs(
    backend: CrossEncoderBackend,
    texts: Sequence[str],
    queries: Sequence[str],
    concurrency: int,
    candidates: int,
) -> list[list[ScoringPair]]:
    """Request i: query i (cycled) with the next `candidates` texts, truncated like the server."""
    return [
        [
            chunks[0]
            for chunks in backend.prepare(
                queries[i % len(queries)],
                _cycle(texts, i * candidates, candidates),
                "first",
                0,
            )
        ]
        for i in range(concurrency)
    ]


def _measure_raw(
    backend: CrossEncoderBackend,
    requests: Sequence[Sequence[ScoringPair]],
    max_batch_pairs: int,
    iterations: int,
) -> dict[str, Any]:
    pool = [pair for pairs in requests for pair in pairs]
    batch = list(itertools.islice(itertools.cycle(pool), max_batch_pairs))
    backend.score(batch)
    scored = 0
    started = time.perf_counter()
    for _ in range(iterations):
        scored += len(backend.score(batch))
    elapsed_s = time.perf_counter() - started
    return {
        "pairs_per_call": len(batch),
        "iterations": iterations,
        "pairs_scored": scored,
        "mean_tokens": float(np.mean([pair.token_length for pair in batch])),
        "seconds": elapsed_s,
        "pairs_per_s": scored / elapsed_s,
        "ms_per_call": elapsed_s / iterations * 1000,
    }


@dataclass
class _Run:
    """One approach's pass over the same requests: scores per request, in request order."""

    scores: list[list[float]] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    model_calls: int = 0
    # Pairs that went through the model, counted where the model is called.
    pairs_scored: int = 0

    def summary(self) -> dict[str, Any]:
        latencies_ms = np.array(self.latencies_s) * 1000
        return {
            "requests": len(self.scores),
            "pairs_scored": self.pairs_scored,
            "model_calls": self.model_calls,
            "wall_s": self.wall_s,
            "pairs_per_s": self.pairs_scored / self.wall_s,
            "requests_per_s": len(self.scores) / self.wall_s,
            "p50_ms": float(np.percentile(latencies_ms, 50)),
            "p95_ms": float(np.percentile(latencies_ms, 95)),
        }


def _measure_batching(
    backend: CrossEncoderBackend,
    requests: Sequence[Sequence[ScoringPair]],
    limits: BatchLimits,
    raw_pairs_per_s: float,
) -> dict[str, Any]:
    micro = asyncio.run(_run_micro_batched(backend, requests, limits))
    naive = _run_naive(backend, requests)
    differences = [
        abs(a - b)
        for batched, alone in zip(micro.scores, naive.scores, strict=True)
        for a, b in zip(batched, alone, strict=True)
    ]
    micro_summary, naive_summary = micro.summary(), naive.summary()
    return {
        "concurrency": len(requests),
        "candidates": len(requests[0]),
        "pairs_requested": sum(len(pairs) for pairs in requests),
        "naive_predict_batch_size": NAIVE_PREDICT_BATCH_SIZE,
        "micro_batched": micro_summary,
        "naive": naive_summary,
        "throughput_ratio": micro_summary["pairs_per_s"] / naive_summary["pairs_per_s"],
        "p50_latency_ratio": micro_summary["p50_ms"] / naive_summary["p50_ms"],
        "efficiency_vs_raw": micro_summary["pairs_per_s"] / raw_pairs_per_s,
        "max_abs_score_diff": max(differences),
    }


async def _run_micro_batched(
    backend: CrossEncoderBackend, requests: Sequence[Sequence[ScoringPair]], limits: BatchLimits
) -> _Run:
    """All requests submitted at once to one MicroBatcher. Token lengths come from `prepare`
    before the clock starts: in the server a separate thread computes them."""
    run = _Run()

    def count(stats: BatchStats) -> None:
        run.model_calls += 1
        if not stats.failed:
            run.pairs_scored += stats.pairs

    with ThreadPoolExecutor(1, thread_name_prefix="bench-model") as executor:
        batcher: MicroBatcher[ScoringPair] = MicroBatcher(backend.score, limits, executor, count)
        await batcher.start()
        try:
            started_s = time.perf_counter()

            async def submit(pairs: Sequence[ScoringPair]) -> tuple[list[float], float]:
                scores = await batcher.submit([(pair, pair.token_length) for pair in pairs])
                return scores, time.perf_counter() - started_s

            outcomes = await asyncio.gather(*(submit(pairs) for pairs in requests))
            run.wall_s = time.perf_counter() - started_s
        finally:
            await batcher.stop()
    run.scores = [scores for scores, _ in outcomes]
    run.latencies_s = [latency_s for _, latency_s in outcomes]
    return run


def _run_naive(backend: CrossEncoderBackend, requests: Sequence[Sequence[ScoringPair]]) -> _Run:
    """Each request on its own thread calls the model's own CrossEncoder.predict, as most
    retrieve-and-rerank code does: no cross-request batching, requests contend for the device.
    Raw logits (identity activation) so the scores compare with the backend's."""
    import torch

    # The backend's own sentence-transformers model: same weights, device and dtype.
    cross_encoder: Any = backend._model
    identity = torch.nn.Identity()

    def predict(pairs: Sequence[ScoringPair]) -> list[float]:
        logits = cross_encoder.predict(
            [(pair.query, pair.text) for pair in pairs],
            batch_size=NAIVE_PREDICT_BATCH_SIZE,
            activation_fn=identity,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        scores: list[float] = logits.astype(float).tolist()
        return scores

    # One call before the threads start: the shared fast tokenizer switches to truncation here,
    # once; threads switching it concurrently fail with "Already borrowed".
    predict(requests[0][:1])
    run = _Run()
    started_s = time.perf_counter()

    def serve(pairs: Sequence[ScoringPair]) -> tuple[list[float], float]:
        scores = predict(pairs)
        return scores, time.perf_counter() - started_s

    with ThreadPoolExecutor(len(requests), thread_name_prefix="bench-naive") as pool:
        outcomes = list(pool.map(serve, requests))
    run.wall_s = time.perf_counter() - started_s
    run.scores = [scores for scores, _ in outcomes]
    run.latencies_s = [latency_s for _, latency_s in outcomes]
    run.pairs_scored = sum(len(scores) for scores in run.scores)
    run.model_calls = sum(math.ceil(len(pairs) / NAIVE_PREDICT_BATCH_SIZE) for pairs in requests)
    return run


async def _measure_cache(
    backend: CrossEncoderBackend, query: str, texts: Sequence[str], limits: BatchLimits
) -> dict[str, Any]:
    """The same request twice through the server's own Reranker: cold (every pair scored), then
    warm (every score from the cache). Pairs through the model are read back from the metrics."""
    metrics = Metrics(CollectorRegistry())
    documents = [
        RerankDocument(DocKey("bench", str(index)), text) for index, text in enumerate(texts)
    ]
    with (
        ThreadPoolExecutor(1, thread_name_prefix="bench-model") as model_executor,
        ThreadPoolExecutor(1, thread_name_prefix="bench-prepare") as prepare_executor,
    ):
        batcher: MicroBatcher[ScoringPair] = MicroBatcher(
            backend.score, limits, model_executor, metrics.observe_batch
        )
        await batcher.start()
        try:
            reranker = Reranker(
                backend,
                batcher,
                ScoreCache(max_entries=2 * len(documents), ttl_s=3600.0),
                prepare_executor,
                metrics,
                overlap_tokens=0,
            )
            started_s = time.perf_counter()
            cold = await reranker.score(query, documents, "first")
            cold_s = time.perf_counter() - started_s
            model_pairs_cold = _sample(metrics, "sidecar_rerank_pairs_total")
            started_s = time.perf_counter()
            warm = await reranker.score(query, documents, "first")
            warm_s = time.perf_counter() - started_s
        finally:
            await batcher.stop()
    return {
        "documents": len(documents),
        "cold_s": cold_s,
        "warm_s": warm_s,
        "cold_pairs_scored": cold.pairs_scored,
        "warm_pairs_scored": warm.pairs_scored,
        "cold_cache_hits": cold.cache_hits,
        "warm_cache_hits": warm.cache_hits,
        "model_pairs_cold": model_pairs_cold,
        "model_pairs_warm": _sample(metrics, "sidecar_rerank_pairs_total") - model_pairs_cold,
        "max_abs_score_diff": max(
            abs(a - b) for a, b in zip(cold.logits, warm.logits, strict=True)
        ),
        "warm_over_cold": warm_s / cold_s,
        "speedup": cold_s / warm_s,
    }


def _sample(metrics: Metrics, name: str) -> int:
    return int(metrics.registry.get_sample_value(name) or 0)


def _measure_dtypes(
    backend: CrossEncoderBackend,
    model: str,
    dtypes: Sequence[str],
    words: Sequence[str],
    query: str,
    *,
    depths: Sequence[int],
    lengths: Sequence[int],
    max_batch_pairs: int,
    iterations: int,
    progress: bool,
) -> list[dict[str, Any]]:
    # Tokenization does not depend on the dtype: the documents are built once per length.
    documents = {
        length: _synthetic_pairs(
            backend, query, words, min(length, backend.max_length), max(depths)
        )
        for length in lengths
    }
    cells: list[dict[str, Any]] = []
    with tqdm(
        total=len(dtypes) * len(depths) * len(lengths),
        desc="dtype grid",
        unit="cell",
        disable=not progress,
    ) as bar:
        for dtype in dtypes:
            measured = backend
            if backend.dtype != dtype:
                measured = CrossEncoderBackend(
                    model, device=backend.device, dtype=dtype, max_length=backend.max_length
                )
                measured.warm_up()
            for depth, length in itertools.product(depths, lengths):
                bar.set_postfix(dtype=dtype, depth=depth, tokens=length)
                cells.append(
                    _measure_cell(
                        measured, documents[length][:depth], length, iterations, max_batch_pairs
                    )
                )
                bar.update()
            if measured is not backend:
                del measured  # one extra model in memory at a time
                if backend.device.startswith("cuda"):
                    import torch

                    torch.cuda.empty_cache()
    baseline = {
        (cell["depth"], cell["length_requested"]): cell
        for cell in cells
        if cell["dtype"] == "float32"
    }
    for cell in cells:
        reference = baseline[cell["depth"], cell["length_requested"]]
        cell["speedup_vs_float32"] = cell["pairs_per_s"] / reference["pairs_per_s"]
        cell["ms_ratio_vs_float32"] = cell["ms_per_request"] / reference["ms_per_request"]
    return cells


def _measure_cell(
    backend: CrossEncoderBackend,
    pairs: Sequence[ScoringPair],
    length_requested: int,
    iterations: int,
    max_batch_pairs: int,
) -> dict[str, Any]:
    """`iterations` requests of `pairs` after one warm-up request (first calls at a new shape
    pay for kernel selection)."""
    _score_request(backend, pairs, max_batch_pairs)
    scored = 0
    started_s = time.perf_counter()
    for _ in range(iterations):
        scored += _score_request(backend, pairs, max_batch_pairs)
    elapsed_s = time.perf_counter() - started_s
    return {
        "dtype": backend.dtype,
        "depth": len(pairs),
        "length_requested": length_requested,
        "tokens": max(pair.token_length for pair in pairs),
        "requests": iterations,
        "pairs_scored": scored,
        "seconds": elapsed_s,
        "pairs_per_s": scored / elapsed_s,
        "ms_per_request": elapsed_s / iterations * 1000,
    }


def _score_request(
    backend: CrossEncoderBackend, pairs: Sequence[ScoringPair], max_batch_pairs: int
) -> int:
    """One request's pairs in consecutive batches of at most `max_batch_pairs`; pairs scored."""
    return sum(
        len(backend.score(pairs[start : start + max_batch_pairs]))
        for start in range(0, len(pairs), max_batch_pairs)
    )


def _single_token_words(
    backend: CrossEncoderBackend, query: str, texts: Sequence[str]
) -> list[str]:
    """Words from `texts` that the tokenizer keeps whole: n of them make an n-token document."""
    words = list(dict.fromkeys(re.findall(r"[a-z]+", " ".join(texts).lower())))
    words = words[:_MAX_VOCABULARY_WORDS]
    if not words:
        return ["text"]
    base = _empty_pair_length(backend, query)
    prepared = backend.prepare(query, words, "first", 0)
    single = [
        w for w, chunks in zip(words, prepared, strict=True) if chunks[0].token_length == base + 1
    ]
    return single or words


def _empty_pair_length(backend: CrossEncoderBackend, query: str) -> int:
    """Tokens of a pair with an empty document: the query plus special tokens."""
    return backend.prepare(query, [""], "first", 0)[0][0].token_length


def _synthetic_pairs(
    backend: CrossEncoderBackend, query: str, words: Sequence[str], pair_tokens: int, count: int
) -> list[ScoringPair]:
    """`count` distinct documents whose pair with `query` is `pair_tokens` tokens long, measured
    with `prepare`. Where that cannot be reached (a query longer than the target, words that do
    not tokenize alone) the nearest length found is kept; callers report the lengths used."""
    word_counts = [max(1, pair_tokens - _empty_pair_length(backend, query))] * count
    pairs: list[ScoringPair] = []
    for _ in range(_MAX_FIT_ROUNDS):
        texts = [
            " ".join(_cycle(words, index * 7, word_count))
            for index, word_count in enumerate(word_counts)
        ]
        pairs = [chunks[0] for chunks in backend.prepare(query, texts, "first", 0)]
        misses = [i for i, pair in enumerate(pairs) if pair.token_length != pair_tokens]
        if not misses:
            break
        for i in misses:
            word_counts[i] = max(1, word_counts[i] + pair_tokens - pairs[i].token_length)
    return pairs
