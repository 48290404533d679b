"""`make demo`: load the bundled sample corpus into a hybrid index and run one example query."""

from __future__ import annotations

from opensearchpy import OpenSearch

from sidecar.config import Settings
from sidecar.embedding import BiEncoder
from sidecar.indexing.loader import load_corpus
from sidecar.indexing.sample import write_sample_corpus
from sidecar.indexing.templates import HYBRID_PIPELINE, VectorOptions, create_index
from sidecar.retrieval.queries import build_hybrid_search

EXAMPLE_QUERY = "how do I make sure cleanup code runs even when an error is raised"


def run_demo(
    settings: Settings, client: OpenSearch, index: str, query: str = EXAMPLE_QUERY
) -> None:
    corpus = settings.cache_dir / "sample" / "pydoc-corpus.jsonl"
    count = write_sample_corpus(corpus)
    print(f"sample corpus: {count} sections of Python's reference documentation -> {corpus}")
    encoder = BiEncoder.from_settings(settings)
    create_index(client, index, VectorOptions(dimension=encoder.dimension))
    report = load_corpus(client, encoder, index, corpus)
    print(
        f"index {index!r}: {report.index_count} documents (bi-encoder on {encoder.device}, {encoder.dtype})"
    )
    body = build_hybrid_search(query, encoder.embed([query])[0], candidates=5)
    response = client.search(index=index, body=body, params={"search_pipeline": HYBRID_PIPELINE})
    print(f"\nquery: {query!r}  (hybrid BM25 + k-NN, fused by the {HYBRID_PIPELINE} pipeline)")
    for rank, hit in enumerate(response["hits"]["hits"], start=1):
        print(f"{rank:>2}. {hit['_score']:.3f}  {hit['_id']:<28} {hit['_source']['title']}")
