"""`sidecar eval` end to end: a tiny BEIR collection made here, loaded through the command, evaluated
through the real sidecar, with the BM25 figure cross-checked against OpenSearch directly."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.embedding import BiEncoder
from sidecar.evaluation import evaluate_run, knee_depth, search
from sidecar.retrieval.queries import build_lexical_search
from tests.integration.conftest import Cluster, profile_of
from tests.integration.sidecar_server import RunningSidecar
from tests.integration.test_indexing import DOCUMENTS, write_corpus

pytestmark = pytest.mark.integration

QUERIES = {
    "q1": "molten rock from the earth",
    "q2": "bread dough fermentation",
    "q3": "planets and storms",
}
QRELS = [
    ("q1", "volcano", 2),
    ("q1", "rust", 0),
    ("q2", "bread", 1),
    ("q3", "jupiter", 1),
    ("q3", "football", 0),
]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    (folder / "qrels").mkdir(parents=True)
    write_corpus(folder / "corpus.jsonl", DOCUMENTS)
    (folder / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in QUERIES.items())
    )
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in QRELS)
    )
    return folder


def test_eval_loads_evaluates_and_writes_reports(
    tiny_sidecar: RunningSidecar,
    opensearch: Cluster,
    encoder: BiEncoder,
    dataset: Path,
    tmp_path: Path,
) -> None:
    index, out = "test-eval-tiny", tmp_path / "report"
    try:
        arguments = [
            "eval",
            "--dataset",
            str(dataset),
            "--index",
            index,
            "--url",
            tiny_sidecar.url,
            "--opensearch",
            opensearch.url,
            "--candidates",
            "5",
            "--out",
            str(out),
            "--sweep-candidates",
            "2,5",
            "--sweep-fusion",
            "rrf,convex:0.3:0.7",
        ]
        assert main(arguments) == 0
        assert opensearch.client.count(index=index)["count"] == len(DOCUMENTS), (
            "loaded because absent"
        )
        report = json.loads((out / "report.json").read_text())
        assert report["queries"] == 3
        assert set(report["quality"]) == {"bm25", "knn", "hybrid", "hybrid+rerank"}
        for scores in report["quality"].values():
            assert set(scores) == {"ndcg@10", "recall@100", "mrr@10"}
            assert all(0.0 <= value <= 1.0 for value in scores.values())

        profile = profile_of(opensearch, index, encoder)
        direct = {
            query_id: {
                hit["_id"]: hit["_score"]
                for hit in opensearch.client.search(
                    index=index, body=build_lexical_search(profile, text, 5)
                )["hits"]["hits"]
            }
            for query_id, text in QUERIES.items()
        }
        qrels = {}
        for query_id, doc, score in QRELS:
            qrels.setdefault(query_id, {})[doc] = score
        assert report["quality"]["bm25"] == pytest.approx(evaluate_run(qrels, direct))

        ceiling = report["recall_ceiling"]
        assert ceiling["relevant"] == 3
        assert (
            ceiling["relevant"]
            == ceiling["lost_by_first_stage"]
            + ceiling["lost_by_rerank_cut"]
            + ceiling["in_final_top_k"]
        )
        assert sum(report["provenance"]["retriever"].values()) == pytest.approx(1.0)
        assert [p["candidates"] for p in report["sweep_candidates"]] == [2, 5]
        assert [(p["fusion"], p["weights"]) for p in report["sweep_fusion"]] == [
            ("rrf", None),
            ("convex", [0.3, 0.7]),
        ]
        assert "| hybrid+rerank |" in (out / "report.md").read_text()
        for plot in ("quality.png", "depth_sweep.png"):
            assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        opensearch.client.indices.delete(index=index, ignore_unavailable=True)


def test_eval_sweeps_the_rerank_depth(
    tiny_sidecar: RunningSidecar, opensearch: Cluster, dataset: Path, tmp_path: Path
) -> None:
    index, out = "test-eval-rerank-depth", tmp_path / "report"
    try:
        arguments = [
            "eval",
            "--dataset",
            str(dataset),
            "--index",
            index,
            "--url",
            tiny_sidecar.url,
            "--opensearch",
            opensearch.url,
            "--modes",
            "hybrid",
            "--candidates",
            "5",
            "--out",
            str(out),
            "--sweep-depth",
            "3,1,8",
        ]
        assert main(arguments) == 0
        report = json.loads((out / "report.json").read_text())
        sweep = report["sweep_rerank_depth"]
        points = sweep["points"]
        assert [p["rerank_depth"] for p in points] == [0, 1, 3, 8], "sorted, from no rerank"
        hybrid = points[0]
        assert {name: hybrid[name] for name in report["quality"]["hybrid"]} == pytest.approx(
            report["quality"]["hybrid"]
        )
        assert hybrid["gain"]["mean"] == 0.0
        assert hybrid["pairs_per_query"] == 0.0
        assert hybrid["rerank_ms"]["mean"] == 0.0

        body = {"index": index, "k": 5, "candidates": 5, "fusion": "convex", "rerank": False}
        read = [
            search(tiny_sidecar.url, body | {"query": text})["candidates"]
            for text in QUERIES.values()
        ]
        for point in points[1:]:
            # No query scores more than min(m, candidates read), so equal means are equal per query.
            expected = statistics.fmean(min(point["rerank_depth"], count) for count in read)
            assert point["pairs_per_query"] == pytest.approx(expected)
            assert point["rerank_ms"]["mean"] > 0.0
            assert point["recall@100"] == pytest.approx(hybrid["recall@100"]), "reordered only"
        assert sweep["knee"] == knee_depth({p["rerank_depth"]: p["gain"]["mean"] for p in points})
        assert "## Rerank depth sweep" in (out / "report.md").read_text()
        assert (out / "depth_rerank_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        opensearch.client.indices.delete(index=index, ignore_unavailable=True)
