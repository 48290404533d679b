import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

DASHBOARD = Path(__file__).resolve().parents[2] / "grafana" / "dashboards" / "sidecar.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}

COUNTERS = (
    "requests",
    "candidates",
    "final_hits",
    "final_hits_by_score",
    "rerank_pairs",
    "rerank_cache_requests",
    "fail_open",
    "rejected_requests",
    "upstream_requests",
    "upstream_ejections",
)
HISTOGRAMS = (
    "request_duration_seconds",
    "stage_duration_seconds",
    "rank_shift",
    "rerank_batch_size",
    "rerank_batch_tokens",
    "rerank_queue_wait_seconds",
    "rerank_inference_seconds",
    "upstream_duration_seconds",
)
GAUGES = (
    "inflight_requests",
    "rerank_queue_depth",
    "build_info",
    "reranker_serving_info",
    "gpu_memory_bytes",
    "upstream_node_ejected",
)
# Every series name the sidecar exports: counters as `_total`, histograms as their three series.
EXPORTED_SERIES = frozenset(
    [f"sidecar_{name}_total" for name in COUNTERS]
    + [f"sidecar_{name}_{suffix}" for name in HISTOGRAMS for suffix in ("bucket", "sum", "count")]
    + [f"sidecar_{name}" for name in GAUGES]
)
# Exported only where CUDA is present, so no panel may depend on it.
CUDA_ONLY = "sidecar_gpu_memory_bytes"
SERIES_NAME = re.compile(r"\bsidecar_[a-z0-9_]+")


def _walk(node: Any, key: str) -> Iterator[Any]:
    """Every value stored under `key` anywhere in a JSON tree, in document order."""
    if isinstance(node, dict):
        for name, value in node.items():
            if name == key:
                yield value
            yield from _walk(value, key)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


def dashboard_expressions(path: str | Path = DASHBOARD) -> list[str]:
    """Every PromQL `expr` in a dashboard JSON file: all panels (rows' nested ones too), all
    targets, in document order."""
    dashboard = json.loads(Path(path).read_text(encoding="utf-8"))
    expressions = list(_walk(dashboard, "expr"))
    assert all(isinstance(expr, str) for expr in expressions)
    return expressions


def _panels(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in node.get("panels", []):
        yield panel
        yield from _panels(panel)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


@pytest.fixture(scope="module")
def expressions() -> list[str]:
    return dashboard_expressions(DASHBOARD)


def test_the_dashboard_has_expressions(expressions: list[str]) -> None:
    assert len(expressions) >= 20


def test_every_expression_uses_only_exported_series(expressions: list[str]) -> None:
    for expr in expressions:
        names = set(SERIES_NAME.findall(expr))
        assert names, f"no sidecar_ series in {expr!r}"
        assert names <= EXPORTED_SERIES, f"unknown series {names - EXPORTED_SERIES} in {expr!r}"


def test_no_expression_depends_on_cuda(expressions: list[str]) -> None:
    assert not [expr for expr in expressions if CUDA_ONLY in expr]


def test_expressions_evaluate_in_plain_prometheus(expressions: list[str]) -> None:
    # Grafana's `$__range`, `$__rate_interval` and template variables mean nothing to Prometheus.
    assert not [expr for expr in expressions if "$" in expr]


def test_every_panel_and_target_uses_the_prometheus_datasource(dashboard: dict[str, Any]) -> None:
    panels = list(_panels(dashboard))
    assert panels
    for panel in panels:
        assert panel.get("datasource") == DATASOURCE, panel.get("title")
        for target in panel.get("targets", []):
            assert target.get("datasource") == DATASOURCE, panel.get("title")


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in _panels(dashboard)]
    assert len(ids) == len(set(ids))


def test_every_panel_is_described_and_rows_are_open(dashboard: dict[str, Any]) -> None:
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            assert panel["collapsed"] is False
        else:
            assert panel.get("description"), panel.get("title")
            assert panel.get("targets"), panel.get("title")


def test_the_main_sections_are_there(dashboard: dict[str, Any]) -> None:
    rows = [panel["title"] for panel in _panels(dashboard) if panel["type"] == "row"]
    for section in ("Traffic", "Stage latency", "Reranker", "Provenance", "Upstream", "Build"):
        assert any(title.startswith(section) for title in rows), section


def test_rank_shift_has_no_sum_series() -> None:
    """prometheus_client omits _sum for histograms with negative buckets (OpenMetrics), so a
    panel built on sidecar_rank_shift_sum would never show data."""
    assert not [e for e in dashboard_expressions(DASHBOARD) if "sidecar_rank_shift_sum" in e]
