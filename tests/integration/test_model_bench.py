"""The in-process reranker benchmarks on a real small cross-encoder: structure, pair counts and the
agreement of micro-batched and naive scores. Never asserts on time."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.indexing.sample import sample_documents, write_sample_corpus
from sidecar.model_bench import (
    SECTIONS,
    available_dtypes,
    format_model_report,
    read_beir_texts,
    run_model_benchmarks,
)
from sidecar.stage2_grid import Stage2Config, fetch_candidates, format_grid, run_grid
from tests.integration.sidecar_server import RunningSidecar

pytestmark = pytest.mark.integration

QUERIES = (
    "how do I catch an exception",
    "what does the with statement do",
    "integer division and modulo",
    "define a class with a constructor",
)
CONCURRENCY, CANDIDATES, DEPTHS, LENGTHS = 4, 5, (5,), (32, 64)


@pytest.fixture(scope="module")
def result(tiny_cross_encoder: Path) -> dict[str, Any]:
    texts = [doc.embedding_text for doc in itertools.islice(sample_documents(), 30)]
    return run_model_benchmarks(
        str(tiny_cross_encoder),
        texts,
        QUERIES,
        device="cpu",
        dtype="float32",
        max_length=128,
        max_batch_pairs=8,
        concurrency=CONCURRENCY,
        candidates=CANDIDATES,
        depths=DEPTHS,
        lengths=LENGTHS,
        iterations=1,
    )


def _numbers(value: Any) -> Iterator[float]:
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)


def test_result_is_json_with_every_section(result: dict[str, Any]) -> None:
    assert json.loads(json.dumps(result)) == result
    assert set(SECTIONS) <= result.keys()
    assert result["device"] == "cpu"
    assert result["dtypes_tested"] == available_dtypes("cpu")
    assert result["dtypes_tested"][0] == "float32"


def test_every_figure_is_finite_and_non_negative(result: dict[str, Any]) -> None:
    figures = list(_numbers({key: result[key] for key in SECTIONS}))
    assert figures
    assert all(math.isfinite(figure) and figure >= 0 for figure in figures)


def test_timings_and_rates_are_positive(result: dict[str, Any]) -> None:
    raw, batching, cache = result["raw"], result["batching"], result["cache"]
    runs = (batching["micro_batched"], batching["naive"])
    figures = [
        raw["seconds"],
        raw["pairs_per_s"],
        raw["ms_per_call"],
        *(run[name] for run in runs for name in ("wall_s", "pairs_per_s", "p50_ms", "p95_ms")),
        batching["throughput_ratio"],
        batching["p50_latency_ratio"],
        batching["efficiency_vs_raw"],
        cache["cold_s"],
        cache["warm_s"],
        cache["warm_over_cold"],
        cache["speedup"],
        *(cell[name] for cell in result["dtypes"] for name in ("pairs_per_s", "ms_per_request")),
    ]
    assert all(math.isfinite(figure) and figure > 0 for figure in figures)


def test_raw_loop_scores_full_batches(result: dict[str, Any]) -> None:
    raw = result["raw"]
    assert raw["pairs_per_call"] == 8
    assert raw["pairs_scored"] == raw["pairs_per_call"] * raw["iterations"] == 8


def test_micro_batched_and_naive_score_the_same_pairs_alike(result: dict[str, Any]) -> None:
    batching = result["batching"]
    micro, naive = batching["micro_batched"], batching["naive"]
    assert batching["pairs_requested"] == CONCURRENCY * CANDIDATES
    assert micro["pairs_scored"] == naive["pairs_scored"] == CONCURRENCY * CANDIDATES
    assert micro["requests"] == naive["requests"] == CONCURRENCY
    # 20 pairs in batches of at most 8; naive: one predict batch per request.
    assert micro["model_calls"] >= 3
    assert naive["model_calls"] == CONCURRENCY
    assert batching["max_abs_score_diff"] <= 1e-3


def test_warm_cache_skips_inference(result: dict[str, Any]) -> None:
    cache = result["cache"]
    assert cache["documents"] == CANDIDATES
    assert cache["cold_pairs_scored"] == cache["model_pairs_cold"] == CANDIDATES
    assert cache["cold_cache_hits"] == 0
    assert cache["warm_pairs_scored"] == cache["model_pairs_warm"] == 0
    assert cache["warm_cache_hits"] == CANDIDATES
    assert cache["max_abs_score_diff"] == 0


def test_dtype_grid_has_one_cell_per_combination(result: dict[str, Any]) -> None:
    cells = result["dtypes"]
    keys = [(cell["dtype"], cell["depth"], cell["length_requested"]) for cell in cells]
    assert sorted(keys) == sorted(itertools.product(result["dtypes_tested"], DEPTHS, LENGTHS))
    for cell in cells:
        assert cell["tokens"] == cell["length_requested"]
        assert cell["pairs_scored"] == cell["depth"] * cell["requests"]
        if cell["dtype"] == "float32":
            assert cell["speedup_vs_float32"] == 1.0
            assert cell["ms_ratio_vs_float32"] == 1.0


def test_report_mentions_every_section(result: dict[str, Any]) -> None:
    report = format_model_report(result)
    for section in SECTIONS:
        assert f"\n{section}: " in report
    for dtype in result["dtypes_tested"]:
        assert dtype in report
    print("\n" + report)


def test_beir_texts_are_read_in_file_order(tmp_path: Path) -> None:
    corpus, queries = tmp_path / "corpus.jsonl", tmp_path / "queries.jsonl"
    corpus.write_text(
        '{"_id": "a", "title": "First", "text": "one"}\n{"_id": "b", "title": "", "text": "two"}\n'
    )
    queries.write_text('{"_id": "q1", "text": "a question"}\n{"_id": "q2", "text": "another"}\n')
    assert read_beir_texts(corpus, queries) == (["First one", "two"], ["a question", "another"])
    assert read_beir_texts(corpus, queries, max_documents=1, max_queries=1) == (
        ["First one"],
        ["a question"],
    )


def test_the_stage2_grid_reranks_the_same_candidates_in_every_configuration(
    tiny_sidecar: RunningSidecar, tiny_cross_encoder: Path, pydoc_index: str, tmp_path: Path
) -> None:
    corpus = tmp_path / "pydoc.jsonl"
    write_sample_corpus(corpus)
    queries = {str(n): query for n, query in enumerate(QUERIES)}
    candidates = fetch_candidates(tiny_sidecar.url, pydoc_index, queries, corpus, 12)
    assert all(len(c.ids) == 12 and all(c.texts) for c in candidates)
    # Judge each query's 8th first-stage hit relevant: reranking has room to move it.
    qrels = {c.query_id: {c.ids[7]: 1} for c in candidates}
    configs = [
        Stage2Config("torch", "float32", "first", 64),
        Stage2Config("onnx", "float32", "first", 64),
        Stage2Config("onnx", "int8-dynamic", "best_passage", 32),
    ]
    result = run_grid(
        str(tiny_cross_encoder),
        configs,
        candidates,
        depths=(4, 12),
        quality_depth=10,
        qrels=qrels,
        cache_dir=tmp_path / "exports",
        progress=False,
    )
    rows = {row["config"]: row for row in result["rows"]}
    assert list(rows) == [config.name for config in configs]
    for row in rows.values():
        assert set(row["p50_ms"]) == {"4", "12"}
        assert row["pairs_per_s"] > 0
        assert 0.0 <= row["ndcg@10"] <= 1.0
    torch_fp32, onnx_fp32 = rows["torch float32 first@64"], rows["onnx float32 first@64"]
    assert torch_fp32["change_vs_baseline"]["mean"] == 0.0
    assert onnx_fp32["ndcg@10"] == pytest.approx(torch_fp32["ndcg@10"]), "same scores, same order"
    assert any(row["pareto"] for row in rows.values())
    assert result["first_stage_ndcg@10"] == pytest.approx(1 / math.log2(9))
    table = format_grid(result)
    assert table.count("\n| ") == len(configs), "a row per configuration under the header"
