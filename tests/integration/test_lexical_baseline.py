"""The lexical stage against the standard baseline on a real collection: Cranfield (1,400 documents,
225 judged queries) through `sidecar eval`, BM25 with the default profile (the published protocol:
best_fields over title and text, tie_breaker 0.5, no boosts) and with the former `title^2` query
reproduced by a profile, side by side on the same index."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from opensearchpy import helpers

from sidecar.cli import main
from sidecar.config import parse_profiles
from sidecar.embedding import BiEncoder
from sidecar.indexing.corpus import read_corpus
from sidecar.indexing.templates import VectorOptions, create_index
from tests.integration.conftest import Cluster
from tests.integration.sidecar_server import running_sidecar

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cranfield(
    opensearch: Cluster, encoder: BiEncoder, shared_data: Path
) -> Iterator[tuple[str, Path]]:
    """Cranfield in an index of the sidecar's layout. Only BM25 is measured here, so documents
    are written without vectors (embedding 1,400 documents would be most of the test's time)."""
    name = f"test-cranfield-{uuid.uuid4().hex[:8]}"
    dataset = shared_data / "cranfield"
    create_index(opensearch.client, name, VectorOptions(dimension=encoder.dimension))
    opensearch.client.indices.put_settings(index=name, body={"number_of_replicas": 0})
    helpers.bulk(
        opensearch.client,
        (
            {"_index": name, "_id": doc.id, "_source": {"title": doc.title, "text": doc.text}}
            for doc in read_corpus(dataset / "corpus.jsonl")
        ),
        refresh=True,
    )
    yield name, dataset
    opensearch.client.indices.delete(index=name, ignore_unavailable=True)
    opensearch.client.indices.delete_index_template(name=f"sidecar-hybrid-{name}", ignore=[404])


def bm25_ndcg(
    cluster: Cluster,
    encoder: BiEncoder,
    model: Path,
    index: str,
    dataset: Path,
    out: Path,
    profiles: dict[str, object] | None = None,
) -> float:
    settings = {"profiles": parse_profiles(profiles)} if profiles else {}
    with running_sidecar(cluster.url, model, encoder, **settings) as server:
        arguments = [
            "eval",
            "--dataset",
            str(dataset),
            "--qrels",
            "qrels/test.tsv",
            "--index",
            index,
            "--modes",
            "bm25",
            "--url",
            server.url,
            "--opensearch",
            cluster.url,
            "--out",
            str(out),
        ]
        assert main(arguments) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["queries"] == 225
    return float(report["quality"]["bm25"]["ndcg@10"])


def test_default_lexical_profile_is_at_least_the_former_query_on_cranfield(
    opensearch: Cluster,
    encoder: BiEncoder,
    tiny_cross_encoder: Path,
    cranfield: tuple[str, Path],
    tmp_path: Path,
) -> None:
    index, dataset = cranfield
    default = bm25_ndcg(opensearch, encoder, tiny_cross_encoder, index, dataset, tmp_path / "a")
    former = bm25_ndcg(
        opensearch,
        encoder,
        tiny_cross_encoder,
        index,
        dataset,
        tmp_path / "b",
        {index: {"lexical": {"fields": ["title^2", "text"], "tie_breaker": 0.0}}},
    )
    print(
        f"Cranfield BM25 nDCG@10: default profile {default:.4f}, former title^2 query {former:.4f}"
    )
    assert default >= former
