"""Evaluation arithmetic on a tiny qrels file, checked against values computed by hand."""

import math
from pathlib import Path

import pytest

from sidecar.evaluation import (
    ModeRuns,
    evaluate_run,
    format_rerank_depth_sweep,
    knee_depth,
    paired_gain,
    per_query_metrics,
    provenance_table,
    read_qrels,
    read_queries,
    recall_ceiling,
)


def test_metrics_match_hand_computed_values(tmp_path: Path) -> None:
    qrels_file = tmp_path / "test.tsv"
    qrels_file.write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t1\nq1\td9\t0\nq2\td5\t1\n"
    )
    qrels = read_qrels(qrels_file)
    assert qrels == {"q1": {"d1": 2, "d2": 1, "d9": 0}, "q2": {"d5": 1}}
    run = {
        "q1": {"d3": 3.0, "d1": 2.0, "d2": 1.0},  # relevant at ranks 2 (gain 2) and 3 (gain 1)
        "q2": {f"x{i}": 100.0 - i for i in range(10)} | {"d5": 1.0},  # relevant at rank 11
    }
    scores = evaluate_run(qrels, run)
    # trec_eval's nDCG gains are the judgment values (as in BEIR's reference numbers):
    # q1: DCG = 2/log2(3) + 1/log2(4); IDCG = 2/log2(2) + 1/log2(3).
    dcg = 2 / math.log2(3) + 1 / 2
    idcg = 2 + 1 / math.log2(3)
    expected_ndcg = (dcg / idcg + 0.0) / 2  # q2's only relevant document is at rank 11
    assert scores["ndcg@10"] == pytest.approx(expected_ndcg, abs=1e-4)
    assert scores["recall@100"] == pytest.approx(1.0)
    assert scores["mrr@10"] == pytest.approx((1 / 2 + 0.0) / 2)


def test_queries_missing_from_the_run_count_as_zero(tmp_path: Path) -> None:
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}}
    scores = evaluate_run(qrels, {"q1": {"d1": 1.0}})
    assert scores == {"ndcg@10": 0.5, "recall@100": 0.5, "mrr@10": 0.5}


def test_per_query_metrics_cover_judged_queries_and_average_to_the_run_means() -> None:
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1, "d3": 1}, "q3": {"d4": 0}}
    run = {"q1": {"x": 2.0, "d1": 1.0}, "q2": {"d2": 1.0}}
    per_query = per_query_metrics(qrels, run)
    assert set(per_query) == {"q1", "q2"}, "a query with no relevant judgment is not scored"
    assert per_query["q1"]["mrr@10"] == 0.5
    assert per_query["q2"]["recall@100"] == 0.5
    means = evaluate_run(qrels, run)
    for name, mean in means.items():
        assert mean == pytest.approx(sum(m[name] for m in per_query.values()) / 2)


def test_paired_gain_summarises_per_query_changes() -> None:
    baseline = {"a": 0.5, "b": 0.2, "c": 0.9, "d": 0.4}
    treated = {"a": 0.7, "b": 0.2, "c": 0.6, "d": 0.9}  # changes +0.2, 0, -0.3, +0.5
    gain = paired_gain(baseline, treated)
    assert gain["queries"] == 4
    assert gain["mean"] == pytest.approx(0.1)
    assert gain["stdev"] == pytest.approx(math.sqrt(0.34 / 3))
    assert (gain["wins"], gain["ties"], gain["losses"]) == (2, 1, 1)
    assert gain["percentiles"]["p50"] == pytest.approx(0.1)
    low, high = gain["ci95"]
    assert -0.3 <= low <= 0.1 <= high <= 0.5
    assert 0.0 < gain["wilcoxon_p"] <= 1.0


def test_paired_gain_separates_a_consistent_gain_from_noise() -> None:
    baseline = {f"q{i}": 0.3 for i in range(40)}
    consistent = paired_gain(baseline, {q: 0.4 + (int(q[1:]) % 5) / 100 for q in baseline})
    assert consistent["ci95"][0] > 0.0
    assert consistent["wilcoxon_p"] < 0.001
    # Exactly representable changes, so equal gains and losses rank as ties in the test.
    halves = {q: 0.5 for q in baseline}
    noise = paired_gain(halves, {q: 0.5 + (0.25 if int(q[1:]) % 2 else -0.25) for q in halves})
    assert noise["ci95"][0] < 0.0 < noise["ci95"][1]
    assert noise["wilcoxon_p"] > 0.5


def test_paired_gain_without_change_and_with_mismatched_queries() -> None:
    same = paired_gain({"a": 0.5, "b": 0.1}, {"a": 0.5, "b": 0.1})
    assert same["mean"] == 0.0
    assert same["ci95"] == [0.0, 0.0]
    assert same["wilcoxon_p"] == 1.0
    with pytest.raises(ValueError, match="same queries"):
        paired_gain({"a": 0.5}, {"b": 0.5})


def test_queries_are_read_for_judged_ids_only(tmp_path: Path) -> None:
    path = tmp_path / "queries.jsonl"
    path.write_text('{"_id": "1", "text": "one"}\n{"_id": 2, "text": "two"}\n\n')
    assert read_queries(path, ["2"]) == {"2": "two"}


def hit(
    doc: str, lexical: int | None, vector: int | None, first_rank: int, normalized: float
) -> dict[str, object]:
    sources = {
        "lexical": None if lexical is None else {"rank": lexical, "score": 1.0},
        "vector": None if vector is None else {"rank": vector, "score": 1.0},
    }
    return {
        "id": doc,
        "sources": sources,
        "first_stage": {"rank": first_rank, "normalized": normalized},
    }


def test_provenance_shares() -> None:
    table = provenance_table(
        [
            hit("a", 1, 2, 1, 0.95),
            hit("b", None, 30, 25, 0.12),
            hit("c", 4, None, 12, 0.5),
            hit("d", 2, 1, 3, 1.0),
        ]
    )
    assert table["retriever"] == {"both": 0.5, "lexical_only": 0.25, "vector_only": 0.25}
    assert table["first_stage_rank"] == {"1-10": 0.5, "11-20": 0.25, "21-50": 0.25}
    assert table["first_stage_score"] == {"0.1-0.2": 0.25, "0.5-0.6": 0.25, "0.9-1.0": 0.5}


def test_recall_ceiling_says_where_relevant_documents_were_lost() -> None:
    collected = ModeRuns()
    collected.runs["bm25"]["q"] = {"r1": 1.0, "x": 0.5}
    collected.runs["knn"]["q"] = {"r2": 1.0}
    collected.candidates["q"] = {"r1", "r2", "x"}
    collected.runs["hybrid+rerank"]["q"] = {"x": 1.0, "r2": 0.5, "r1": 0.3}
    counts = recall_ceiling({"q": {"r1": 1, "r2": 2, "r3": 1, "n": 0}}, collected, k=2)
    assert counts == {
        "relevant": 3,
        "found_by_bm25": 1,
        "found_by_knn": 1,
        "in_candidates": 2,
        "in_final_top_k": 1,
        "lost_by_first_stage": 1,
        "lost_by_rerank_cut": 1,
    }


def test_knee_is_the_shallowest_depth_with_ninety_percent_of_the_largest_gain() -> None:
    gains = {0: 0.0, 5: 0.05, 10: 0.091, 20: 0.1, 50: 0.095, 100: 0.08}
    assert knee_depth(gains) == 10, "0.091 reaches 90% of 0.1; 0.05 does not"
    assert knee_depth({0: 0.0, 5: 0.09, 10: 0.1}) == 5, "exactly 90% counts"
    assert knee_depth(gains, share=1.0) == 20


def test_no_knee_without_a_positive_gain() -> None:
    assert knee_depth({0: 0.0, 5: -0.02, 10: -0.01}) is None
    assert knee_depth({0: 0.0, 5: 0.0}) is None
    assert knee_depth({}) is None


def depth_point(
    depth: int, ndcg: float, gain: float, pairs: float, mean_ms: float
) -> dict[str, object]:
    return {
        "rerank_depth": depth,
        "ndcg@10": ndcg,
        "recall@100": 0.9,
        "mrr@10": ndcg - 0.05,
        "gain": {"mean": gain, "ci95": [gain - 0.01, gain + 0.01]},
        "pairs_per_query": pairs,
        "rerank_ms": {"mean": mean_ms, "p50": mean_ms - 1, "p95": mean_ms + 2},
    }


def test_rerank_depth_table_marks_hybrid_and_the_knee() -> None:
    points = [
        depth_point(0, 0.4, 0.0, 0.0, 0.0),
        depth_point(5, 0.46, 0.06, 5.0, 12.0),
        depth_point(10, 0.5, 0.1, 9.5, 23.25),
    ]
    lines = format_rerank_depth_sweep({"knee_share": 0.9, "knee": 10, "points": points})
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| m ")]
    assert rows == [
        "| 0 (hybrid) | 0.4000 | +0.0000 (-0.0100 to +0.0100) | 0.9000 | 0.3500 | 0.0 | 0.0 "
        "| -1.0 | 2.0 |",
        "| 5 | 0.4600 | +0.0600 (+0.0500 to +0.0700) | 0.9000 | 0.4100 | 5.0 | 12.0 | 11.0 | 14.0 |",
        "| 10 (knee) | 0.5000 | +0.1000 (+0.0900 to +0.1100) | 0.9000 | 0.4500 | 9.5 | 23.2 "
        "| 22.2 | 25.2 |",
    ]
    assert lines[-1] == (
        "Knee: m = 10, the smallest depth whose gain reaches 90% of the largest (+0.1000, at m = 10)."
    )


def test_rerank_depth_table_says_when_nothing_gained() -> None:
    points = [depth_point(0, 0.4, 0.0, 0.0, 0.0), depth_point(5, 0.3, -0.1, 5.0, 12.0)]
    lines = format_rerank_depth_sweep({"knee_share": 0.9, "knee": None, "points": points})
    assert "(knee)" not in "\n".join(lines)
    assert lines[-1] == "No rerank depth gained nDCG@10 over hybrid: no knee."
