"""Applying the shipped index template and search pipelines (`index_templates/`) to a cluster.

The JSON files are the source of truth; this module only fills in what depends on the target:
the index name, the embedding dimension and the documented HNSW knobs.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from opensearchpy import OpenSearch

HYBRID_PIPELINE = "sidecar-hybrid-minmax"
RRF_PIPELINE = "sidecar-hybrid-rrf"
VECTOR_FIELD = "embedding"
NEURAL_SEARCH_PLUGIN = "opensearch-neural-search"
# The analyzed fields of a sidecar index: what BM25 searches, the reranker reads and the
# bi-encoder embeds (joined in this order).
TEXT_FIELDS = ("title", "text")
# The score-ranker-processor (RRF) exists from this version on.
_RRF_MIN_VERSION = (2, 19)

Engine = Literal["lucene", "faiss"]
SpaceType = Literal["cosinesimil", "innerproduct", "l2"]


class IndexLayoutError(RuntimeError):
    """An existing index does not have the layout the sidecar needs; the message says what differs."""


@dataclass(frozen=True)
class VectorOptions:
    """The knn_vector field's knobs (see `_meta.knobs` in hybrid-index-template.json)."""

    dimension: int
    engine: Engine = "lucene"
    space_type: SpaceType = "cosinesimil"
    m: int = 16
    ef_construction: int = 128


@dataclass(frozen=True)
class CreateReport:
    template: str
    index_created: bool
    pipelines: tuple[str, ...]
    # What the template gives a new index; None: the cluster's default.
    replicas: int | None


def templates_dir() -> Path:
    """The shipped JSON: inside the installed package (wheel), else at the source checkout's root."""
    packaged = Path(__file__).resolve().parents[1] / "index_templates"
    return (
        packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "index_templates"
    )


def load_json(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((templates_dir() / name).read_text())
    return loaded


def render_index_template(
    index: str, vector: VectorOptions, replicas: int | None = None
) -> dict[str, Any]:
    """The composable index template for exactly `index`, with the vector knobs filled in and
    `replicas` (None: the cluster's default)."""
    template = copy.deepcopy(load_json("hybrid-index-template.json"))
    template["index_patterns"] = [index]
    if replicas is not None:
        template["template"]["settings"]["index"]["number_of_replicas"] = replicas
    field = template["template"]["mappings"]["properties"][VECTOR_FIELD]
    field["dimension"] = vector.dimension
    field["space_type"] = vector.space_type
    field["method"]["engine"] = vector.engine
    field["method"]["parameters"] = {"m": vector.m, "ef_construction": vector.ef_construction}
    return template


def create_index(
    client: OpenSearch, index: str, vector: VectorOptions, replicas: int | None = None
) -> CreateReport:
    """Put the template and pipelines, then create `index` if absent. Safe to repeat.

    `replicas` None: 0 on a single-node cluster, where a replica could never be assigned and
    the index would stay yellow; else the cluster's default. An existing index keeps its own.
    Raises IndexLayoutError when `index` exists with a vector field that does not match.
    """
    if replicas is None and client.cluster.health()["number_of_data_nodes"] == 1:
        replicas = 0
    template_name = f"sidecar-hybrid-{index}"
    client.indices.put_index_template(
        name=template_name, body=render_index_template(index, vector, replicas)
    )
    pipelines: list[str] = []
    # The pipelines' processors come with neural-search; a cluster without it gets the index
    # alone (the sidecar's own fusion modes need no pipeline).
    if _has_neural_search(client):
        client.transport.perform_request(
            "PUT",
            f"/_search/pipeline/{HYBRID_PIPELINE}",
            body=load_json("hybrid-search-pipeline.json"),
        )
        pipelines.append(HYBRID_PIPELINE)
        if _cluster_version(client) >= _RRF_MIN_VERSION:
            client.transport.perform_request(
                "PUT",
                f"/_search/pipeline/{RRF_PIPELINE}",
                body=load_json("rrf-search-pipeline.json"),
            )
            pipelines.append(RRF_PIPELINE)
    created = False
    if client.indices.exists(index=index):
        check_layout(client, index, vector.dimension)
    else:
        client.indices.create(index=index)
        created = True
    return CreateReport(
        template=template_name,
        index_created=created,
        pipelines=tuple(pipelines),
        replicas=replicas,
    )


def check_layout(client: OpenSearch, index: str, dimension: int) -> None:
    """Raise IndexLayoutError unless `index` has a knn_vector field of `dimension`."""
    mapping = client.indices.get_mapping(index=index)
    properties = next(iter(mapping.values()))["mappings"].get("properties", {})
    field = properties.get(VECTOR_FIELD)
    if field is None or field.get("type") != "knn_vector":
        raise IndexLayoutError(
            f"index {index!r} exists without a knn_vector field {VECTOR_FIELD!r}; "
            "delete it or choose another name"
        )
    if field.get("dimension") != dimension:
        raise IndexLayoutError(
            f"index {index!r} has {VECTOR_FIELD!r} of dimension {field.get('dimension')}, but the "
            f"bi-encoder produces {dimension}; use the model the index was built with, or reindex"
        )


def _has_neural_search(client: OpenSearch) -> bool:
    plugins = client.cat.plugins(format="json")
    return any(row.get("component") == NEURAL_SEARCH_PLUGIN for row in plugins)


def _cluster_version(client: OpenSearch) -> tuple[int, int]:
    number = client.info()["version"]["number"]
    major, minor = number.split(".")[:2]
    return int(major), int(minor)
