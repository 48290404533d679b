"""The search pipeline's query-vector cache, with a fake bi-encoder (pure logic: which texts reach
the model); tests/integration runs the pipeline with the real models and cluster."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CollectorRegistry

from sidecar.config import Settings
from sidecar.embedding import EncoderPool
from sidecar.metrics import Metrics
from sidecar.pipeline import SearchPipeline


class FakeEncoder:
    """Records the texts it embeds; the vector is the text's length."""

    model_name = "fake"
    dimension = 1

    def __init__(self) -> None:
        self.texts: list[str] = []

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.texts += texts
        return [[float(len(text))] for text in texts]


def embed_all(queries: Sequence[str]) -> tuple[list[bool], list[str]]:
    """Whether each query's vector came from the cache, and the texts the encoder saw."""
    encoder = FakeEncoder()
    with ThreadPoolExecutor(1) as executor:
        pipeline = SearchPipeline(
            Settings(),
            EncoderPool(encoder),  # type: ignore[arg-type]
            profiles=None,  # type: ignore[arg-type]
            upstream=None,  # type: ignore[arg-type]
            reranker=None,  # type: ignore[arg-type]
            embed_executor=executor,
            metrics=Metrics(CollectorRegistry()),
        )

        async def run() -> list[bool]:
            return [(await pipeline.embed_query(query, None))[1] for query in queries]

        cached = asyncio.run(run())
    return cached, encoder.texts


def test_a_repeated_query_is_embedded_once() -> None:
    assert embed_all(["what is bm25", "what is bm25"]) == ([False, True], ["what is bm25"])


def test_queries_differing_in_case_or_spacing_are_embedded_apart() -> None:
    # A cased bi-encoder gives "Apple" and "apple" different vectors.
    queries = ["Apple stock", "apple stock", " apple  stock"]
    assert embed_all(queries) == ([False, False, False], queries)
