"""The stage-2 grid's pure parts: which configurations exist, the Pareto front, the table."""

from __future__ import annotations

from typing import Any

from sidecar.stage2_grid import _mark_pareto, format_grid, grid


def row(name: str, ndcg: float, p50: float) -> dict[str, Any]:
    return {
        "config": name,
        "pairs_per_s": 100.0,
        "p50_ms": {"20": p50 / 4, "100": p50},
        "ndcg@10": ndcg,
        "change_vs_baseline": {"mean": 0.0, "ci95": [-0.01, 0.01]},
    }


def test_the_grid_covers_every_installed_runtime_precision_and_truncation() -> None:
    configs = grid(["float32"], [("first", 256), ("best_passage", 128)])
    names = {config.name for config in configs}
    assert "torch float32 first@256" in names
    assert "onnx int8-dynamic best_passage@128" in names
    assert "openvino int8-static first@256" in names
    assert len(configs) == len(names) == 2 * (1 + 3 + 2)


def test_bf16_is_measured_only_where_the_machine_runs_it() -> None:
    with_bf16 = {c.name for c in grid(["float32", "bfloat16"], [("first", 256)])}
    assert {"torch bfloat16 first@256", "openvino bfloat16 first@256"} <= with_bf16
    assert not any("bfloat16" in c.name for c in grid(["float32"], [("first", 256)]))


def test_the_front_keeps_what_nothing_beats_on_both_quality_and_latency() -> None:
    rows = [
        row("slow best", 0.75, 2000),
        row("fast good", 0.74, 800),
        row("dominated", 0.73, 900),
        row("fastest worst", 0.70, 300),
        row("same as fast good", 0.74, 800),
    ]
    _mark_pareto(rows, 100)
    front = {r["config"] for r in rows if r["pareto"]}
    assert front == {"slow best", "fast good", "fastest worst", "same as fast good"}


def test_the_table_has_a_column_per_depth_and_stars_the_front() -> None:
    rows = [row("a", 0.75, 2000), row("b", 0.70, 2500)]
    _mark_pareto(rows, 100)
    result = {
        "depths": [20, 100],
        "quality_depth": 20,
        "rows": rows,
        "first_stage_ndcg@10": 0.7,
        "queries": 3,
        "alpha": 0.4,
        "normalization": "sigmoid",
    }
    lines = format_grid(result).splitlines()
    assert lines[0] == (
        "| configuration | pairs/s | p50 ms @20 | p50 ms @100 | nDCG@10 (rerank 20) "
        "| vs first configuration | Pareto |"
    )
    assert lines[2] == "| a | 100.0 | 500 | 2000 | 0.7500 | +0.0000 (-0.0100 to +0.0100) | ★ |"
    assert lines[3].endswith("|  |"), "b is slower and worse"
    assert "nDCG@10 0.7000 over 3 queries" in lines[-1]
