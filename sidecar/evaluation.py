"""`sidecar eval`: retrieval quality of each stage on a BEIR collection, measured through the sidecar.

One native request per query with rerank off and `explain` returns each retriever's own list and
the fused candidates, so the BM25, k-NN and hybrid runs all come from it; a second request with
rerank on gives hybrid+rerank. Metrics are trec_eval's own (pytrec_eval), not re-implemented.
The sweeps repeat runs at other candidate depths, fusions, or rerank depths.
"""

from __future__ import annotations

import json
import statistics
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytrec_eval
from tqdm import tqdm

from sidecar.metrics import rank_range, score_range

MODES = ("bm25", "knn", "hybrid", "hybrid+rerank")
# trec_eval measures: nDCG@10, Recall@100; MRR@10 is recip_rank over each run cut to 10.
_MEASURES = {"ndcg_cut.10", "recall.100"}
Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]
# The knee of the rerank depth sweep: the shallowest depth with this share of the largest gain.
KNEE_SHARE = 0.9


class EvalError(RuntimeError):
    """The collection or the sidecar cannot be evaluated; the message says why."""


def read_qrels(path: Path) -> Qrels:
    """BEIR qrels TSV (`query-id  corpus-id  score`, with a header line)."""
    qrels: Qrels = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split("\t")
        if number == 1 and not fields[-1].strip().lstrip("-").isdigit():
            continue
        if len(fields) < 3:
            raise EvalError(f"{path}:{number}: expected query-id, corpus-id, score")
        qrels.setdefault(fields[0].strip(), {})[fields[1].strip()] = int(fields[2])
    return qrels


def read_queries(path: Path, wanted: Iterable[str]) -> dict[str, str]:
    """Query texts from BEIR queries.jsonl, for the ids in `wanted` (those with judgments)."""
    ids = set(wanted)
    queries = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            entry = json.loads(line)
            if str(entry["_id"]) in ids:
                queries[str(entry["_id"])] = entry["text"]
    return queries


def evaluate_run(qrels: Qrels, run: Run) -> dict[str, float]:
    """Mean nDCG@10, Recall@100 and MRR@10 over the judged queries (a query absent from the run
    scores 0, as trec_eval's -c option would count it)."""
    per_query = per_query_metrics(qrels, run)
    count = len(per_query) or 1
    return {
        name: sum(metrics[name] for metrics in per_query.values()) / count
        for name in ("ndcg@10", "recall@100", "mrr@10")
    }


def per_query_metrics(qrels: Qrels, run: Run) -> dict[str, dict[str, float]]:
    """nDCG@10, Recall@100 and MRR@10 of each query with a relevant judgment."""
    judged = {q: docs for q, docs in qrels.items() if any(rel > 0 for rel in docs.values())}
    full = {q: run.get(q, {}) or {"__none__": 0.0} for q in judged}
    top10 = {
        q: dict(sorted(docs.items(), key=lambda item: -item[1])[:10]) for q, docs in full.items()
    }
    measured = pytrec_eval.RelevanceEvaluator(judged, _MEASURES).evaluate(full)
    reciprocal = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(top10)
    return {
        q: {
            "ndcg@10": measured[q]["ndcg_cut_10"],
            "recall@100": measured[q]["recall_100"],
            "mrr@10": reciprocal[q]["recip_rank"],
        }
        for q in judged
    }


def per_query_ndcg(qrels: Qrels, run: Run) -> dict[str, float]:
    """nDCG@10 of each query with a relevant judgment: the unit `paired_gain` compares."""
    return {q: metrics["ndcg@10"] for q, metrics in per_query_metrics(qrels, run).items()}


def paired_gain(baseline: Mapping[str, float], treated: Mapping[str, float]) -> dict[str, Any]:
    """How a per-query metric changed from `baseline` to `treated` over the same queries: the mean
    change with a 95% bootstrap confidence interval (10,000 resamples, seeded), its spread
    (standard deviation, percentiles), wins/ties/losses, and the Wilcoxon signed-rank p-value,
    the usual paired test for IR metrics (their differences are not normally distributed).

    Raises ValueError when the two do not cover the same queries.
    """
    import scipy.stats  # here, not at the top: a second of import for every `sidecar` command

    if set(baseline) != set(treated):
        raise ValueError("the baseline and the treated run must cover the same queries")
    deltas = np.array([treated[q] - baseline[q] for q in sorted(baseline)])
    if not deltas.size:
        raise ValueError("no queries to compare")
    mean = float(deltas.mean())
    if np.all(deltas == deltas[0]):  # no spread: the interval is the value, the test undefined
        low, high, p_value = mean, mean, 1.0 if mean == 0 else 0.0
    else:
        interval = scipy.stats.bootstrap(
            (deltas,),
            np.mean,
            confidence_level=0.95,
            n_resamples=10_000,
            method="percentile",
            rng=np.random.default_rng(0),
        ).confidence_interval
        low, high = float(interval.low), float(interval.high)
        nonzero = deltas[deltas != 0]
        p_value = (
            float(scipy.stats.wilcoxon(nonzero, method="approx").pvalue) if nonzero.size else 1.0
        )
    percentiles = np.percentile(deltas, [10, 25, 50, 75, 90])
    return {
        "queries": int(deltas.size),
        "mean": mean,
        "ci95": [low, high],
        "stdev": float(deltas.std(ddof=1)) if deltas.size > 1 else 0.0,
        "percentiles": dict(
            zip(("p10", "p25", "p50", "p75", "p90"), map(float, percentiles), strict=True)
        ),
        "wins": int((deltas > 0).sum()),
        "ties": int((deltas == 0).sum()),
        "losses": int((deltas < 0).sum()),
        "wilcoxon_p": p_value,
    }


@dataclass
class ModeRuns:
    """Per-query rankings for each mode plus what the responses said about cost and provenance."""

    runs: dict[str, Run] = field(default_factory=lambda: {mode: {} for mode in MODES})
    timings_ms: dict[str, list[float]] = field(default_factory=dict)
    final_top: list[dict[str, Any]] = field(default_factory=list)
    candidates: dict[str, set[str]] = field(default_factory=dict)
    pairs_scored: list[int] = field(default_factory=list)


def search(
    sidecar_url: str,
    body: Mapping[str, Any],
    timeout_s: float = 600.0,
    headers: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """`POST /v1/search`, as the caller `headers` identify (a secured cluster's user)."""
    request = urllib.request.Request(
        f"{sidecar_url}/v1/search",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            answer: dict[str, Any] = json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise EvalError(f"the sidecar answered {error.code}: {error.read()[:500]!r}") from None
    except (urllib.error.URLError, OSError) as error:
        raise EvalError(f"cannot reach the sidecar at {sidecar_url}: {error}") from None
    return answer


def collect_runs(
    sidecar_url: str,
    index: str,
    queries: Mapping[str, str],
    *,
    modes: Sequence[str],
    k: int,
    candidates: int,
    fusion: str = "convex",
    weights: tuple[float, float] | None = None,
    rerank_depth: int | None = None,
    progress: bool = True,
    label: str = "eval",
    headers: Mapping[str, str] | None = None,
) -> ModeRuns:
    """Each query's ranking in each of `modes`, sent through the sidecar; the rerank request
    reranks only the first `rerank_depth` candidates (None: the sidecar's default)."""
    collected = ModeRuns()
    first_stage_modes = {"bm25", "knn", "hybrid"} & set(modes)
    for query_id, text in tqdm(queries.items(), desc=label, unit="query", disable=not progress):
        body: dict[str, Any] = {
            "index": index,
            "query": text,
            "k": candidates,
            "candidates": candidates,
            "fusion": fusion,
        }
        if weights is not None:
            body["weights"] = list(weights)
        if first_stage_modes:
            answer = search(sidecar_url, body | {"rerank": False, "explain": True}, headers=headers)
            hits = answer["hits"]
            collected.candidates[query_id] = {hit["id"] for hit in hits}
            for mode, retriever in (("bm25", "lexical"), ("knn", "vector")):
                ranking = (entry["id"] for entry in answer["retrievers"][retriever])
                collected.runs[mode][query_id] = _by_position(ranking)
            collected.runs["hybrid"][query_id] = _by_position(hit["id"] for hit in hits)
            _add_timings(collected.timings_ms, "first_stage", answer["timings_ms"])
        if "hybrid+rerank" in modes:
            # Scored afresh: the rerank cost reported must not depend on earlier runs.
            rerank_body = body | {"rerank": True, "rerank_cache": False}
            if rerank_depth is not None:
                rerank_body["rerank_depth"] = rerank_depth
            answer = search(sidecar_url, rerank_body, headers=headers)
            hits = answer["hits"]
            collected.runs["hybrid+rerank"][query_id] = _by_position(hit["id"] for hit in hits)
            collected.candidates.setdefault(query_id, {hit["id"] for hit in hits})
            collected.final_top.extend(hit | {"query_id": query_id} for hit in hits[:k])
            if (pairs := answer["rerank"]["pairs_scored"]) is None:
                raise EvalError(
                    f"the sidecar at {sidecar_url} does not report pairs scored, which the rerank "
                    "cost figures are made of: serve it with SIDECAR_REPORT_CACHE_STATS=true"
                )
            collected.pairs_scored.append(pairs)
            _add_timings(collected.timings_ms, "rerank_request", answer["timings_ms"])
    return collected


def provenance_table(final_top: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Share of the final top-k by retriever, first-stage rank range and score range."""
    by: dict[str, Counter[str]] = {
        "retriever": Counter(),
        "first_stage_rank": Counter(),
        "first_stage_score": Counter(),
    }
    for hit in final_top:
        lexical, vector = hit["sources"]["lexical"], hit["sources"]["vector"]
        by["retriever"][
            "both" if lexical and vector else "lexical_only" if lexical else "vector_only"
        ] += 1
        by["first_stage_rank"][rank_range(hit["first_stage"]["rank"])] += 1
        by["first_stage_score"][score_range(hit["first_stage"]["normalized"] or 0.0)] += 1
    total = len(final_top) or 1
    return {
        name: {key: round(count / total, 4) for key, count in sorted(counts.items())}
        for name, counts in by.items()
    }


def recall_ceiling(qrels: Qrels, collected: ModeRuns, k: int) -> dict[str, int]:
    """Where relevant documents were lost: not in either retriever's list, not among the fused
    candidates, or among the candidates but cut from the final top-k by the reranker."""
    relevant = {
        q: {d for d, rel in docs.items() if rel > 0}
        for q, docs in qrels.items()
        if q in collected.candidates
    }
    counts = Counter[str]()
    for query_id, wanted in relevant.items():
        final = list(collected.runs["hybrid+rerank"].get(query_id, {}))[:k]
        counts["relevant"] += len(wanted)
        counts["found_by_bm25"] += len(wanted & set(collected.runs["bm25"].get(query_id, {})))
        counts["found_by_knn"] += len(wanted & set(collected.runs["knn"].get(query_id, {})))
        counts["in_candidates"] += len(wanted & collected.candidates[query_id])
        counts["in_final_top_k"] += len(wanted & set(final))
    counts["lost_by_first_stage"] = counts["relevant"] - counts["in_candidates"]
    counts["lost_by_rerank_cut"] = counts["in_candidates"] - counts["in_final_top_k"]
    return dict(counts)


def latency_summary(timings: Mapping[str, list[float]]) -> dict[str, dict[str, float]]:
    summary = {}
    for key, values in sorted(timings.items()):
        ordered = sorted(values)
        summary[key] = {
            "p50": round(statistics.median(ordered), 2),
            "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
            "mean": round(statistics.fmean(ordered), 2),
        }
    return summary


def _by_position(ids: Iterable[str]) -> dict[str, float]:
    """A ranking as a run: scores fall with position, so trec_eval keeps the order given."""
    return {doc: 1.0 / position for position, doc in enumerate(ids, start=1)}


def _add_timings(
    into: dict[str, list[float]], request: str, timings_ms: Mapping[str, float]
) -> None:
    for stage, value in timings_ms.items():
        if value:
            into.setdefault(f"{request}.{stage}", []).append(value)


@dataclass(frozen=True)
class EvalOptions:
    modes: Sequence[str] = MODES
    k: int = 10
    candidates: int = 100
    fusion: str = "convex"
    sweep_candidates: Sequence[int] = ()
    sweep_fusions: Sequence[tuple[str, tuple[float, float] | None]] = ()
    sweep_rerank_depths: Sequence[int] = ()
    limit: int | None = None
    progress: bool = True
    # The caller's identity for every search (never shown: the password is in it).
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)


def run_evaluation(
    sidecar_url: str, index: str, qrels: Qrels, queries: Mapping[str, str], options: EvalOptions
) -> dict[str, Any]:
    """Every mode, then the requested sweeps; returns the whole report as plain data."""
    chosen = dict(list(queries.items())[: options.limit] if options.limit else queries.items())
    scoped = {q: qrels[q] for q in chosen if q in qrels}
    collected = collect_runs(
        sidecar_url,
        index,
        chosen,
        modes=options.modes,
        k=options.k,
        candidates=options.candidates,
        fusion=options.fusion,
        progress=options.progress,
        headers=options.headers,
    )
    report: dict[str, Any] = {
        "index": index,
        "queries": len(chosen),
        "k": options.k,
        "candidates": options.candidates,
        "fusion": options.fusion,
        "quality": {mode: evaluate_run(scoped, collected.runs[mode]) for mode in options.modes},
        "latency_ms": latency_summary(collected.timings_ms),
    }
    per_query = {mode: per_query_ndcg(scoped, collected.runs[mode]) for mode in options.modes}
    report["per_query_ndcg@10"] = per_query
    if {"hybrid", "hybrid+rerank"} <= set(options.modes):
        report["rerank_gain"] = paired_gain(per_query["hybrid"], per_query["hybrid+rerank"])
    if "hybrid+rerank" in options.modes:
        report["provenance"] = provenance_table(collected.final_top)
        if {"bm25", "knn"} <= set(options.modes):
            report["recall_ceiling"] = recall_ceiling(scoped, collected, options.k)
    report["sweep_candidates"] = [
        _depth_point(sidecar_url, index, scoped, chosen, depth, options)
        for depth in options.sweep_candidates
    ]
    report["sweep_fusion"] = []
    for fusion, weights in options.sweep_fusions:
        runs = collect_runs(
            sidecar_url,
            index,
            chosen,
            modes=("hybrid",),
            k=options.k,
            candidates=options.candidates,
            fusion=fusion,
            weights=weights,
            progress=options.progress,
            headers=options.headers,
            label=f"fusion {fusion} {weights or ''}",
        )
        report["sweep_fusion"].append(
            {"fusion": fusion, "weights": weights, **evaluate_run(scoped, runs.runs["hybrid"])}
        )
    if options.sweep_rerank_depths:
        hybrid = (
            collected.runs["hybrid"]
            if "hybrid" in options.modes
            else collect_runs(
                sidecar_url,
                index,
                chosen,
                modes=("hybrid",),
                k=options.k,
                candidates=options.candidates,
                fusion=options.fusion,
                progress=options.progress,
                headers=options.headers,
                label="hybrid",
            ).runs["hybrid"]
        )
        report["sweep_rerank_depth"] = sweep_rerank_depth(
            sidecar_url, index, scoped, chosen, hybrid, options
        )
    return report


def _depth_point(
    sidecar_url: str,
    index: str,
    qrels: Qrels,
    queries: Mapping[str, str],
    depth: int,
    options: EvalOptions,
) -> dict[str, Any]:
    """Quality of hybrid+rerank at one candidate depth, against its rerank cost."""
    runs = collect_runs(
        sidecar_url,
        index,
        queries,
        modes=("hybrid", "hybrid+rerank"),
        k=options.k,
        candidates=depth,
        fusion=options.fusion,
        progress=options.progress,
        headers=options.headers,
        label=f"depth {depth}",
    )
    rerank_ms = runs.timings_ms.get("rerank_request.rerank", [0.0])
    return {
        "candidates": depth,
        "hybrid": evaluate_run(qrels, runs.runs["hybrid"]),
        "hybrid+rerank": evaluate_run(qrels, runs.runs["hybrid+rerank"]),
        "pairs_per_query": statistics.fmean(runs.pairs_scored) if runs.pairs_scored else 0.0,
        "rerank_ms_p50": statistics.median(rerank_ms),
    }


def sweep_rerank_depth(
    sidecar_url: str,
    index: str,
    qrels: Qrels,
    queries: Mapping[str, str],
    hybrid: Run,
    options: EvalOptions,
) -> dict[str, Any]:
    """Quality and rerank cost with only the first m candidates reranked, for each m in
    `options.sweep_rerank_depths`, from m = 0 (the `hybrid` run, no rerank, cost 0) on; each
    point's nDCG@10 gain over hybrid is paired per query, and the knee (`knee_depth`) is marked.
    The score cache is bypassed, so the cost is the model's."""
    baseline = per_query_ndcg(qrels, hybrid)
    points = [_rerank_depth_point(0, qrels, hybrid, baseline, pairs_scored=[], rerank_ms=[])]
    for depth in sorted(set(options.sweep_rerank_depths)):
        runs = collect_runs(
            sidecar_url,
            index,
            queries,
            modes=("hybrid+rerank",),
            k=options.k,
            candidates=options.candidates,
            fusion=options.fusion,
            rerank_depth=depth,
            progress=options.progress,
            headers=options.headers,
            label=f"rerank depth {depth}",
        )
        points.append(
            _rerank_depth_point(
                depth,
                qrels,
                runs.runs["hybrid+rerank"],
                baseline,
                pairs_scored=runs.pairs_scored,
                rerank_ms=runs.timings_ms.get("rerank_request.rerank", []),
            )
        )
    return {
        "knee_share": KNEE_SHARE,
        "knee": knee_depth({p["rerank_depth"]: p["gain"]["mean"] for p in points}),
        "points": points,
    }


def _rerank_depth_point(
    depth: int,
    qrels: Qrels,
    run: Run,
    baseline: Mapping[str, float],
    *,
    pairs_scored: Sequence[int],
    rerank_ms: list[float],
) -> dict[str, Any]:
    return {
        "rerank_depth": depth,
        **evaluate_run(qrels, run),
        "gain": paired_gain(baseline, per_query_ndcg(qrels, run)),
        "pairs_per_query": statistics.fmean(pairs_scored) if pairs_scored else 0.0,
        "rerank_ms": (
            latency_summary({"rerank": rerank_ms})["rerank"]
            if rerank_ms
            else dict.fromkeys(("p50", "p95", "mean"), 0.0)
        ),
    }


def knee_depth(gains: Mapping[int, float], share: float = KNEE_SHARE) -> int | None:
    """The smallest rerank depth whose mean nDCG@10 gain (`gains`: depth → gain over hybrid)
    reaches `share` of the largest gain: deeper costs in proportion for ever less. None when no
    depth gained."""
    largest = max(gains.values(), default=0.0)
    if largest <= 0:
        return None
    # Slack for float rounding, so a gain at exactly the share (0.09 of 0.1) counts.
    threshold = share * largest * (1 - 1e-9)
    return min(depth for depth, gain in gains.items() if gain >= threshold)


def write_report(report: Mapping[str, Any], out: Path) -> list[Path]:
    """report.json, report.md and PNG plots in `out`; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json", out / "report.md"]
    written[0].write_text(json.dumps(report, indent=2) + "\n")
    written[1].write_text(format_markdown(report))

    quality = report["quality"]
    figure, axes = plt.subplots(figsize=(7, 4))
    metrics = ("ndcg@10", "recall@100", "mrr@10")
    width = 0.8 / len(quality)
    for offset, (mode, values) in enumerate(quality.items()):
        axes.bar(
            [i + offset * width for i in range(len(metrics))],
            [values[m] for m in metrics],
            width,
            label=mode,
        )
    axes.set_xticks([i + 0.4 - width / 2 for i in range(len(metrics))], metrics)
    axes.set_ylim(0, 1)
    axes.set_title(f"{report['index']}: quality per mode ({report['queries']} queries)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / "quality.png", dpi=120)
    plt.close(figure)
    written.append(out / "quality.png")

    if "rerank_gain" in report:
        per_query = report["per_query_ndcg@10"]
        deltas = [
            per_query["hybrid+rerank"][q] - per_query["hybrid"][q] for q in per_query["hybrid"]
        ]
        figure, axes = plt.subplots(figsize=(7, 4))
        axes.hist(deltas, bins=np.linspace(-1, 1, 41).tolist(), color="tab:blue")
        axes.axvline(report["rerank_gain"]["mean"], color="black", linestyle="--", label="mean")
        axes.set_xlabel("nDCG@10 change per query (hybrid+rerank - hybrid)")
        axes.set_ylabel("queries")
        axes.set_title(f"{report['index']}: rerank gain per query ({len(deltas)} queries)")
        axes.legend()
        figure.tight_layout()
        figure.savefig(out / "rerank_gain.png", dpi=120)
        plt.close(figure)
        written.append(out / "rerank_gain.png")

    if report["sweep_candidates"]:
        points = report["sweep_candidates"]
        figure, axes = plt.subplots(figsize=(7, 4))
        depths = [p["candidates"] for p in points]
        axes.plot(
            depths,
            [p["hybrid+rerank"]["ndcg@10"] for p in points],
            marker="o",
            label="hybrid+rerank nDCG@10",
        )
        axes.plot(
            depths, [p["hybrid"]["ndcg@10"] for p in points], marker="s", label="hybrid nDCG@10"
        )
        axes.set_xlabel("candidates reranked")
        axes.set_ylabel("nDCG@10")
        cost = axes.twinx()
        cost.plot(
            depths,
            [p["rerank_ms_p50"] for p in points],
            color="grey",
            linestyle="--",
            label="rerank ms (p50)",
        )
        cost.set_ylabel("rerank ms (p50)")
        axes.legend(loc="lower right")
        axes.set_title("Quality against rerank cost by candidate depth")
        figure.tight_layout()
        figure.savefig(out / "depth_sweep.png", dpi=120)
        plt.close(figure)
        written.append(out / "depth_sweep.png")

    if "sweep_rerank_depth" in report:
        sweep = report["sweep_rerank_depth"]
        depths = [p["rerank_depth"] for p in sweep["points"]]
        figure, axes = plt.subplots(figsize=(7, 4))
        axes.plot(depths, [p["ndcg@10"] for p in sweep["points"]], marker="o", label="nDCG@10")
        if sweep["knee"] is not None:
            axes.axvline(
                sweep["knee"], color="tab:red", linestyle=":", label=f"knee: {sweep['knee']}"
            )
        axes.set_xlabel("rerank depth (candidates reranked; 0: hybrid, no rerank)")
        axes.set_ylabel("nDCG@10")
        cost = axes.twinx()
        cost.plot(
            depths,
            [p["rerank_ms"]["mean"] for p in sweep["points"]],
            color="grey",
            linestyle="--",
            marker="s",
            label="rerank ms (mean)",
        )
        cost.set_ylabel("rerank ms (mean)")
        quality_handles, quality_labels = axes.get_legend_handles_labels()
        cost_handles, cost_labels = cost.get_legend_handles_labels()
        axes.legend(quality_handles + cost_handles, quality_labels + cost_labels, loc="lower right")
        axes.set_title(
            f"{report['index']}: nDCG@10 and rerank cost by depth "
            f"({report['candidates']} candidates)"
        )
        figure.tight_layout()
        figure.savefig(out / "depth_rerank_sweep.png", dpi=120)
        plt.close(figure)
        written.append(out / "depth_rerank_sweep.png")
    return written


def format_markdown(report: Mapping[str, Any]) -> str:
    lines = [
        f"# Evaluation: {report['index']}",
        "",
        f"{report['queries']} queries, k = {report['k']}, candidates = {report['candidates']} per retriever, "
        f"fusion = {report['fusion']}.",
        "",
        "| mode | nDCG@10 | Recall@100 | MRR@10 |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {mode} | {v['ndcg@10']:.4f} | {v['recall@100']:.4f} | {v['mrr@10']:.4f} |"
        for mode, v in report["quality"].items()
    ]
    if "rerank_gain" in report:
        gain = report["rerank_gain"]
        spread = gain["percentiles"]
        lines += [
            "",
            "## Rerank gain over hybrid (nDCG@10, per query)",
            "",
            f"Mean {gain['mean']:+.4f} (95% bootstrap CI {gain['ci95'][0]:+.4f} to "
            f"{gain['ci95'][1]:+.4f}), standard deviation {gain['stdev']:.4f} over "
            f"{gain['queries']} queries; better on {gain['wins']}, unchanged on {gain['ties']}, "
            f"worse on {gain['losses']}; Wilcoxon signed-rank p = {gain['wilcoxon_p']:.2g}.",
            "",
            "| p10 | p25 | median | p75 | p90 |",
            "|---|---|---|---|---|",
            f"| {spread['p10']:+.4f} | {spread['p25']:+.4f} | {spread['p50']:+.4f} | "
            f"{spread['p75']:+.4f} | {spread['p90']:+.4f} |",
        ]
    lines += [
        "",
        "## Latency (ms)",
        "",
        "| request.stage | p50 | p95 | mean |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {key} | {v['p50']} | {v['p95']} | {v['mean']} |"
        for key, v in report["latency_ms"].items()
    ]
    if "provenance" in report:
        lines += ["", f"## Provenance of the final top-{report['k']}", ""]
        for name, shares in report["provenance"].items():
            lines += [f"| {name} | share |", "|---|---|"]
            lines += [f"| {key} | {share:.1%} |" for key, share in shares.items()]
            lines.append("")
    if "recall_ceiling" in report:
        lines += ["## Where relevant documents were lost", "", "| count | documents |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in report["recall_ceiling"].items()]
    if report["sweep_candidates"]:
        lines += [
            "",
            "## Candidate depth sweep",
            "",
            "| candidates | hybrid nDCG@10 | +rerank nDCG@10 | pairs/query | rerank ms p50 |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {p['candidates']} | {p['hybrid']['ndcg@10']:.4f} | {p['hybrid+rerank']['ndcg@10']:.4f} | "
            f"{p['pairs_per_query']:.0f} | {p['rerank_ms_p50']:.0f} |"
            for p in report["sweep_candidates"]
        ]
    if report["sweep_fusion"]:
        lines += [
            "",
            "## Fusion sweep (hybrid, no rerank)",
            "",
            "| fusion | weights | nDCG@10 | Recall@100 | MRR@10 |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {p['fusion']} | {p['weights'] or 'default'} | {p['ndcg@10']:.4f} | {p['recall@100']:.4f} | {p['mrr@10']:.4f} |"
            for p in report["sweep_fusion"]
        ]
    if "sweep_rerank_depth" in report:
        lines += ["", *format_rerank_depth_sweep(report["sweep_rerank_depth"])]
    return "\n".join(lines) + "\n"


def format_rerank_depth_sweep(sweep: Mapping[str, Any]) -> list[str]:
    """The rerank depth sweep as report.md lines: a table from m = 0 (hybrid) and the knee."""
    points, knee = sweep["points"], sweep["knee"]
    lines = [
        "## Rerank depth sweep",
        "",
        "Only the first m candidates reranked (score cache bypassed), the rest in first-stage "
        "order below them; m = 0 is hybrid. Gain: nDCG@10 over hybrid, paired per query, with "
        "its 95% bootstrap CI.",
        "",
        "| m | nDCG@10 | gain (95% CI) | Recall@100 | MRR@10 | pairs/query "
        "| rerank ms mean | p50 | p95 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        depth = p["rerank_depth"]
        label = "0 (hybrid)" if depth == 0 else f"{depth} (knee)" if depth == knee else str(depth)
        gain, cost = p["gain"], p["rerank_ms"]
        lines.append(
            f"| {label} | {p['ndcg@10']:.4f} | {gain['mean']:+.4f} ({gain['ci95'][0]:+.4f} to "
            f"{gain['ci95'][1]:+.4f}) | {p['recall@100']:.4f} | {p['mrr@10']:.4f} | "
            f"{p['pairs_per_query']:.1f} | {cost['mean']:.1f} | {cost['p50']:.1f} | "
            f"{cost['p95']:.1f} |"
        )
    lines.append("")
    if knee is None:
        lines.append("No rerank depth gained nDCG@10 over hybrid: no knee.")
    else:
        best = max(points, key=lambda p: p["gain"]["mean"])
        lines.append(
            f"Knee: m = {knee}, the smallest depth whose gain reaches {sweep['knee_share']:.0%} "
            f"of the largest ({best['gain']['mean']:+.4f}, at m = {best['rerank_depth']})."
        )
    return lines
