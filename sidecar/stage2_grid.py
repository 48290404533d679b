"""Stage 2 configurations side by side for `sidecar bench --model-bench`: every runtime x
precision x truncation this machine runs, each timed on the same real candidate lists at
several depths and, given held-out judgments, scored for nDCG@10 the way the sidecar ranks
(blend, depth, first-stage order below); the Pareto front of quality against latency marked.

Candidates come once from a running sidecar's first stage (rerank off), so every configuration
reranks exactly the same documents. Asserts nothing about time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sidecar.config import Normalization, Quantization, RerankRuntime, Truncation
from sidecar.evaluation import Qrels, evaluate_run, paired_gain, per_query_ndcg, search
from sidecar.rerank.backend import CrossEncoderBackend, ScoringPair
from sidecar.rerank.runtimes import available_runtimes
from sidecar.scoring import minmax_first_stage, rerank_order
from sidecar.training.data import read_documents

# Requests timed per depth (different queries, after one warm-up request).
_TIMED_REQUESTS = 5


@dataclass(frozen=True)
class Stage2Config:
    runtime: RerankRuntime
    # torch: float32 / bfloat16; onnx / openvino: float32, bfloat16 (openvino), int8-dynamic,
    # int8-static.
    precision: str
    truncation: Truncation
    # Longest document window in tokens for best_passage; the pair length for first.
    tokens: int

    @property
    def name(self) -> str:
        return f"{self.runtime} {self.precision} {self.truncation}@{self.tokens}"


@dataclass(frozen=True)
class Candidates:
    """One query's first-stage candidates, best first, with fused scores and texts."""

    query_id: str
    query: str
    ids: list[str]
    fused: list[float]
    texts: list[str]


def grid(
    dtypes: Sequence[str], truncations: Sequence[tuple[Truncation, int]]
) -> list[Stage2Config]:
    """Every runtime installed x its precisions x `truncations`. `dtypes` are the torch dtypes
    this machine runs natively (bf16 only where the CPU has bf16 units)."""
    precisions: dict[RerankRuntime, list[str]] = {"torch": list(dtypes)}
    if "onnx" in available_runtimes():
        precisions["onnx"] = ["float32", "int8-dynamic", "int8-static"]
    if "openvino" in available_runtimes():
        precisions["openvino"] = [*dtypes, "int8-static"]
    return [
        Stage2Config(runtime, precision, truncation, tokens)
        for runtime, names in precisions.items()
        for precision in names
        for truncation, tokens in truncations
    ]


def fetch_candidates(
    sidecar_url: str,
    index: str,
    queries: Mapping[str, str],
    corpus: Path,
    depth: int,
) -> list[Candidates]:
    """Each query's `depth` hybrid candidates from the sidecar's first stage (rerank off), with
    the texts the rerank stage would read. Raises EvalError when the sidecar fails."""
    answers = {
        query_id: search(
            sidecar_url,
            {"index": index, "query": text, "k": depth, "candidates": depth, "rerank": False},
        )["hits"]
        for query_id, text in queries.items()
    }
    texts = read_documents(corpus, {hit["id"] for hits in answers.values() for hit in hits})
    return [
        Candidates(
            query_id,
            queries[query_id],
            [hit["id"] for hit in hits],
            [float(hit["first_stage"]["score"] or 0.0) for hit in hits],
            [texts.get(hit["id"], "") for hit in hits],
        )
        for query_id, hits in answers.items()
    ]


def run_grid(
    model: str,
    configs: Sequence[Stage2Config],
    candidates: Sequence[Candidates],
    *,
    depths: Sequence[int] = (20, 50, 100),
    quality_depth: int = 20,
    qrels: Qrels | None = None,
    normalization: Normalization = "sigmoid",
    alpha: float = 1.0,
    max_batch_pairs: int = 64,
    overlap_tokens: int = 32,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Each configuration timed at each depth (p50 per request and pairs/s, prepare included:
    tokenizing and choosing passages is part of the cost) and, with `qrels`, its nDCG@10 when it
    reranks the first `quality_depth` candidates of every judged query, with the gain over the
    first stage and over the first configuration (the baseline) and their 95% CIs.

    Static int8 is calibrated on pairs of the candidates themselves (the first query's and the
    ones after it, not the judged pairs' labels). Raises ValueError on empty inputs."""
    if not configs or not candidates:
        raise ValueError("the stage-2 grid needs configurations and candidate lists")
    calibration = [
        (c.query, text) for c in candidates[:16] for text in c.texts[:16] if text.strip()
    ]
    rows = []
    baseline_per_query: dict[str, float] | None = None
    first_stage_per_query = (
        per_query_ndcg(qrels, {c.query_id: _positions(c.ids) for c in candidates}) if qrels else {}
    )
    for config in tqdm(configs, desc="stage-2 grid", disable=not progress):
        backend = _backend(model, config, calibration, cache_dir)
        timing = _time_depths(backend, config, candidates, depths, max_batch_pairs, overlap_tokens)
        row: dict[str, Any] = {"config": config.name, **config.__dict__, **timing}
        if qrels:
            run = {
                c.query_id: _reranked_run(
                    backend,
                    config,
                    c,
                    quality_depth,
                    normalization,
                    alpha,
                    max_batch_pairs,
                    overlap_tokens,
                )
                for c in candidates
            }
            per_query = per_query_ndcg(qrels, run)
            row["ndcg@10"] = evaluate_run(qrels, run)["ndcg@10"]
            row["gain_vs_first_stage"] = paired_gain(first_stage_per_query, per_query)
            if baseline_per_query is None:
                baseline_per_query = per_query
            row["change_vs_baseline"] = paired_gain(baseline_per_query, per_query)
        rows.append(row)
        del backend
    _mark_pareto(rows, max(depths))
    result: dict[str, Any] = {
        "model": model,
        "depths": list(depths),
        "quality_depth": quality_depth,
        "queries": len(candidates),
        "normalization": normalization,
        "alpha": alpha,
        "rows": rows,
    }
    if qrels:
        result["first_stage_ndcg@10"] = statistics.fmean(first_stage_per_query.values())
    return result


def format_grid(result: Mapping[str, Any]) -> str:
    """The grid as a Markdown table, Pareto-front rows starred."""
    depths = result["depths"]
    quality = "ndcg@10" in result["rows"][0]
    headers = ["configuration", "pairs/s", *(f"p50 ms @{d}" for d in depths)]
    if quality:
        headers += [f"nDCG@10 (rerank {result['quality_depth']})", "vs first configuration"]
    headers.append("Pareto")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in result["rows"]:
        cells = [row["config"], f"{row['pairs_per_s']:.1f}"]
        cells += [f"{row['p50_ms'][str(d)]:.0f}" for d in depths]
        if quality:
            change = row["change_vs_baseline"]
            cells += [
                f"{row['ndcg@10']:.4f}",
                f"{change['mean']:+.4f} ({change['ci95'][0]:+.4f} to {change['ci95'][1]:+.4f})",
            ]
        cells.append("★" if row["pareto"] else "")
        lines.append("| " + " | ".join(cells) + " |")
    if quality:
        lines.append(
            f"\nFirst stage alone (hybrid): nDCG@10 {result['first_stage_ndcg@10']:.4f} over "
            f"{result['queries']} queries; alpha {result['alpha']}, {result['normalization']}."
        )
    return "\n".join(lines)


def _backend(
    model: str,
    config: Stage2Config,
    calibration: Sequence[tuple[str, str]],
    cache_dir: Path | None,
) -> CrossEncoderBackend:
    quantization: Quantization = "none"
    dtype = config.precision
    if config.precision.startswith("int8-"):
        quantization = "dynamic" if config.precision == "int8-dynamic" else "static"
        dtype = "float32"
    max_length = config.tokens if config.truncation == "first" else None
    return CrossEncoderBackend(
        model,
        device="cpu" if config.runtime != "torch" else "auto",
        dtype=dtype,
        max_length=max_length,
        runtime=config.runtime,
        quantization=quantization,
        calibration=calibration,
        cache_dir=cache_dir,
    )


def _score_documents(
    backend: CrossEncoderBackend,
    config: Stage2Config,
    query: str,
    texts: Sequence[str],
    max_batch_pairs: int,
    overlap_tokens: int,
) -> list[float]:
    """One logit per text (its best window for max_chunk), as the Reranker computes them."""
    passage_tokens = config.tokens if config.truncation == "best_passage" else None
    prepared = backend.prepare(query, texts, config.truncation, overlap_tokens, passage_tokens)
    flat: list[ScoringPair] = [pair for pairs in prepared for pair in pairs]
    scores: list[float] = []
    for start in range(0, len(flat), max_batch_pairs):
        scores += backend.score(flat[start : start + max_batch_pairs])
    logits, offset = [], 0
    for pairs in prepared:
        logits.append(max(scores[offset : offset + len(pairs)]))
        offset += len(pairs)
    return logits


def _time_depths(
    backend: CrossEncoderBackend,
    config: Stage2Config,
    candidates: Sequence[Candidates],
    depths: Sequence[int],
    max_batch_pairs: int,
    overlap_tokens: int,
) -> dict[str, Any]:
    p50: dict[str, float] = {}
    pairs, seconds = 0, 0.0
    for depth in depths:
        requests = [c for c in candidates if len(c.texts) >= depth][: _TIMED_REQUESTS + 1]
        if not requests:
            continue
        durations = []
        for number, request in enumerate(requests):
            started = time.perf_counter()
            _score_documents(
                backend,
                config,
                request.query,
                request.texts[:depth],
                max_batch_pairs,
                overlap_tokens,
            )
            if number:  # the first request warms up
                durations.append(time.perf_counter() - started)
                pairs += depth
        seconds += sum(durations)
        p50[str(depth)] = statistics.median(durations) * 1000 if durations else float("nan")
    return {"p50_ms": p50, "pairs_per_s": pairs / seconds if seconds else 0.0}


def _reranked_run(
    backend: CrossEncoderBackend,
    config: Stage2Config,
    candidates: Candidates,
    depth: int,
    normalization: Normalization,
    alpha: float,
    max_batch_pairs: int,
    overlap_tokens: int,
) -> dict[str, float]:
    """The final order the sidecar would return: the first `depth` readable candidates reranked
    (blended with the first stage), the rest after them in first-stage order."""
    within = [i for i in range(min(depth, len(candidates.ids))) if candidates.texts[i].strip()]
    logits = _score_documents(
        backend,
        config,
        candidates.query,
        [candidates.texts[i] for i in within],
        max_batch_pairs,
        overlap_tokens,
    )
    first_stage = minmax_first_stage(candidates.fused) if candidates.fused else []
    order = rerank_order(logits, [first_stage[i] for i in within], normalization, alpha)
    reranked = [candidates.ids[within[j]] for j, _ in order]
    chosen = set(reranked)
    return _positions(reranked + [doc for doc in candidates.ids if doc not in chosen])


def _positions(ids: Sequence[str]) -> dict[str, float]:
    return {doc: float(len(ids) - rank) for rank, doc in enumerate(ids)}


def _mark_pareto(rows: list[dict[str, Any]], depth: int) -> None:
    """A row is on the front when no other is at least as good on both quality (nDCG@10, when
    measured) and latency (p50 at `depth`) and better on one."""

    def point(row: Mapping[str, Any]) -> tuple[float, float]:
        return (row.get("ndcg@10", 0.0), -row["p50_ms"].get(str(depth), float("inf")))

    for row in rows:
        mine = point(row)
        row["pareto"] = not any(
            (other := point(candidate))[0] >= mine[0] and other[1] >= mine[1] and other != mine
            for candidate in rows
        )
