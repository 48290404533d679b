"""`sidecar soak` against a real sidecar: a short soak at a fixed rate reads the sidecar's resident
memory and cache sizes from its /metrics, and the caches stay within their configured bounds while
more distinct queries and documents pass than they can hold."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sidecar.embedding import BiEncoder
from sidecar.soak import soak
from tests.integration.conftest import Cluster
from tests.integration.sidecar_server import running_sidecar
from tests.integration.test_sidecar import QUERY

pytestmark = pytest.mark.integration

SCORE_ENTRIES = 40
QUERY_VECTORS = 3


def test_a_short_soak_reports_memory_and_bounded_caches(
    opensearch: Cluster,
    encoder: BiEncoder,
    tiny_cross_encoder: Path,
    pydoc_index: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    queries = [f"{QUERY} {n}" for n in range(8)]  # more than either cache holds
    with running_sidecar(
        opensearch.url,
        tiny_cross_encoder,
        encoder,
        rerank_cache_entries=SCORE_ENTRIES,
        query_cache_entries=QUERY_VECTORS,
    ) as server:
        summary = asyncio.run(
            soak(
                url=server.url,
                index=pydoc_index,
                queries=queries,
                rate=3.0,
                duration_s=4.0,
                candidates=20,
                k=3,
                report_every_s=2.0,
            )
        )
    progress = capsys.readouterr().out.splitlines()
    assert len(progress) == 3, "the start, one progress line at 2 s, the summary"
    assert summary["requests"] == 12
    assert summary["errors"] == 0, summary["statuses"]
    for figures in (summary["start"], summary["end"]):
        assert figures["rss_bytes"] > 100 * 1024 * 1024, "the models are resident"
    end = summary["end"]
    assert end["cache_scores"] == SCORE_ENTRIES, "filled to its bound, not past it"
    assert end["cache_query_vectors"] == QUERY_VECTORS
    assert end["cache_mappings"] == 1
