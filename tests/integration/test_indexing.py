"""Index template, pipelines and loader against the real cluster and the real bi-encoder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.cli import main
from sidecar.config import ENV_PREFIX
from sidecar.embedding import BiEncoder
from sidecar.indexing.loader import load_corpus
from sidecar.indexing.templates import (
    HYBRID_PIPELINE,
    RRF_PIPELINE,
    IndexLayoutError,
    VectorOptions,
    create_index,
)
from sidecar.retrieval.queries import build_hybrid_search, build_lexical_query, build_vector_query
from tests.integration.conftest import Cluster, profile_of

pytestmark = pytest.mark.integration

DOCUMENTS = [
    (
        "volcano",
        "Volcanic eruptions",
        "Magma rises through the crust and erupts as lava and ash from a volcano.",
    ),
    (
        "bread",
        "Baking sourdough",
        "A sourdough starter ferments flour and water; the dough is kneaded and baked in an oven.",
    ),
    (
        "football",
        "The offside rule",
        "In association football a player is offside when nearer the goal line than the ball.",
    ),
    (
        "jupiter",
        "The largest planet",
        "Jupiter is a gas giant with a great red spot, a storm larger than Earth.",
    ),
    (
        "piano",
        "Learning the piano",
        "Practising scales and chords every day helps beginners play the keyboard instrument.",
    ),
    (
        "tax",
        "Income tax returns",
        "Citizens file an annual return declaring wages so the revenue service can assess what they owe.",
    ),
    (
        "vaccine",
        "How vaccines work",
        "A vaccine trains the immune system to recognise a pathogen without causing the disease.",
    ),
    (
        "rust",
        "Iron corrosion",
        "Iron exposed to oxygen and moisture oxidises, forming reddish flaky rust.",
    ),
]


def write_corpus(path: Path, documents: list[tuple[str, str, str]]) -> Path:
    lines = [
        json.dumps({"_id": i, "title": t, "text": x, "metadata": {"n": n}})
        for n, (i, t, x) in enumerate(documents)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def index_name(opensearch: Cluster) -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    opensearch.client.indices.delete(index=name, ignore_unavailable=True)
    opensearch.client.indices.delete_index_template(name=f"sidecar-hybrid-{name}", ignore=[404])


@pytest.fixture
def loaded_index(opensearch: Cluster, encoder: BiEncoder, index_name: str, tmp_path: Path) -> str:
    create_index(opensearch.client, index_name, VectorOptions(dimension=encoder.dimension))
    load_corpus(
        opensearch.client,
        encoder,
        index_name,
        write_corpus(tmp_path / "c.jsonl", DOCUMENTS),
        show_progress=False,
    )
    return index_name


def top_ids(response: dict[str, Any]) -> list[str]:
    return [hit["_id"] for hit in response["hits"]["hits"]]


def test_local_node_has_the_knn_and_neural_search_plugins(opensearch: Cluster) -> None:
    plugins = {row["component"] for row in opensearch.client.cat.plugins(format="json")}
    assert {"opensearch-knn", "opensearch-neural-search"} <= plugins


def test_bm25_query_finds_the_document_with_the_words(
    opensearch: Cluster, encoder: BiEncoder, loaded_index: str
) -> None:
    profile = profile_of(opensearch, loaded_index, encoder)
    query = {"query": build_lexical_query(profile, "sourdough starter")}
    assert top_ids(opensearch.client.search(index=loaded_index, body=query))[0] == "bread"


def test_knn_query_finds_a_paraphrase_without_shared_words(
    opensearch: Cluster, encoder: BiEncoder, loaded_index: str
) -> None:
    text = "what makes metal go orange and crumbly when left outside"
    profile = profile_of(opensearch, loaded_index, encoder)
    query = {"size": 3, "query": build_vector_query(profile, text, encoder.embed([text])[0], k=3)}
    assert top_ids(opensearch.client.search(index=loaded_index, body=query))[0] == "rust"


@pytest.mark.parametrize("pipeline", [HYBRID_PIPELINE, RRF_PIPELINE])
def test_hybrid_query_through_the_search_pipeline(
    opensearch: Cluster, encoder: BiEncoder, loaded_index: str, pipeline: str
) -> None:
    text = "immune system protection from disease"
    profile = profile_of(opensearch, loaded_index, encoder)
    query = build_hybrid_search(profile, text, encoder.embed([text])[0], candidates=5)
    del query["search_pipeline"]  # the shipped pipeline named below instead of the inline one
    response = opensearch.client.search(
        index=loaded_index, body=query, params={"search_pipeline": pipeline}
    )
    assert top_ids(response)[0] == "vaccine"
    scores = [hit["_score"] for hit in response["hits"]["hits"]]
    assert scores == sorted(scores, reverse=True)
    if pipeline == HYBRID_PIPELINE:
        assert all(0.0 <= s <= 1.0 for s in scores), "min-max + mean keeps fused scores in [0, 1]"


def test_create_and_load_twice_is_idempotent(
    opensearch: Cluster, encoder: BiEncoder, index_name: str, tmp_path: Path
) -> None:
    corpus = write_corpus(tmp_path / "c.jsonl", DOCUMENTS)
    options = VectorOptions(dimension=encoder.dimension)
    first = create_index(opensearch.client, index_name, options)
    first_load = load_corpus(opensearch.client, encoder, index_name, corpus, show_progress=False)
    second = create_index(opensearch.client, index_name, options)
    second_load = load_corpus(opensearch.client, encoder, index_name, corpus, show_progress=False)
    assert first.index_created
    assert not second.index_created
    assert first_load.index_count == second_load.index_count == len(DOCUMENTS)
    source = opensearch.client.get(index=index_name, id="jupiter")["_source"]
    assert source["title"] == "The largest planet"
    assert source["metadata"] == {"n": 3}
    assert len(source["embedding"]) == encoder.dimension


def test_existing_index_with_another_dimension_is_refused(
    opensearch: Cluster, encoder: BiEncoder, index_name: str
) -> None:
    create_index(opensearch.client, index_name, VectorOptions(dimension=encoder.dimension))
    with pytest.raises(
        IndexLayoutError, match=f"dimension {encoder.dimension}, but the bi-encoder produces 8"
    ):
        create_index(opensearch.client, index_name, VectorOptions(dimension=8))


def test_a_new_index_gets_no_replica_on_a_single_node_unless_asked(
    opensearch: Cluster, index_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    single_node = opensearch.client.cluster.health()["number_of_data_nodes"] == 1
    create = ["index", "create", "--index", index_name, "--opensearch", opensearch.url]
    assert main(create) == 0
    assert json.loads(capsys.readouterr().out)["replicas"] == (0 if single_node else None)
    if single_node:
        health = opensearch.client.cluster.health(index=index_name, wait_for_status="green")
        assert health["status"] == "green"
    opensearch.client.indices.delete(index=index_name)
    assert main([*create, "--replicas", "2"]) == 0
    settings = opensearch.client.indices.get_settings(index=index_name)[index_name]["settings"]
    assert settings["index"]["number_of_replicas"] == "2"


def test_index_create_reads_the_dimension_from_the_models_files_without_torch(
    opensearch: Cluster, encoder: BiEncoder, index_name: str
) -> None:
    create = ["index", "create", "--index", index_name, "--opensearch", opensearch.url]
    script = (
        "import json, sys\n"
        "from sidecar.cli import main\n"
        f"code = main({create!r})\n"
        "print(json.dumps([code, sorted(set(sys.modules) & {'torch', 'sentence_transformers'})]))\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    completed = subprocess.run(
        [sys.executable, "-c", script], env=environ, capture_output=True, text=True, check=True
    )
    assert json.loads(completed.stdout.splitlines()[-1]) == [0, []]
    mapping = opensearch.client.indices.get_mapping(index=index_name)[index_name]["mappings"]
    assert mapping["properties"]["embedding"]["dimension"] == encoder.dimension


def test_cli_load_skips_and_reports_bad_lines(
    opensearch: Cluster, index_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = write_corpus(tmp_path / "c.jsonl", DOCUMENTS[:3])
    with corpus.open("a") as handle:
        handle.write('{"_id": "broken"\n{"_id": "no-text", "title": ""}\n')
    assert (
        main(
            [
                "index",
                "load",
                "--index",
                index_name,
                "--opensearch",
                opensearch.url,
                "--corpus",
                str(corpus),
            ]
        )
        == 1
    )
    assert "c.jsonl:4: not valid JSON" in capsys.readouterr().err
    arguments = [
        "index",
        "load",
        "--index",
        index_name,
        "--opensearch",
        opensearch.url,
        "--corpus",
        str(corpus),
        "--skip-bad",
    ]
    assert main(arguments) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["skipped_lines"] == [4, 5]
    assert report["index_count"] == report["distinct_ids"] == 3


def test_loading_cranfield_gives_exactly_1400_documents(
    opensearch: Cluster, encoder: BiEncoder, index_name: str, shared_data: Path
) -> None:
    create_index(opensearch.client, index_name, VectorOptions(dimension=encoder.dimension))
    report = load_corpus(
        opensearch.client, encoder, index_name, shared_data / "cranfield" / "corpus.jsonl"
    )
    assert report.distinct_ids == report.index_count == 1400
    assert opensearch.client.count(index=index_name)["count"] == 1400
