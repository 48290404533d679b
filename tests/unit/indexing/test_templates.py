from sidecar.indexing.templates import VectorOptions, load_json, render_index_template


def test_template_targets_exactly_the_index_with_the_model_dimension() -> None:
    template = render_index_template(
        "docs", VectorOptions(dimension=768, m=32, ef_construction=256)
    )
    assert template["index_patterns"] == ["docs"]
    assert template["template"]["settings"]["index"]["knn"] is True
    field = template["template"]["mappings"]["properties"]["embedding"]
    assert field["type"] == "knn_vector"
    assert field["dimension"] == 768
    assert field["method"] == {
        "name": "hnsw",
        "engine": "lucene",
        "parameters": {"m": 32, "ef_construction": 256},
    }


def test_rendering_does_not_mutate_the_shipped_template() -> None:
    render_index_template("a", VectorOptions(dimension=3, engine="faiss"))
    shipped = load_json("hybrid-index-template.json")
    assert (
        shipped["template"]["mappings"]["properties"]["embedding"]["method"]["engine"] == "lucene"
    )


def test_pipelines_fuse_lexical_then_vector() -> None:
    hybrid = load_json("hybrid-search-pipeline.json")["phase_results_processors"][0]
    processor = hybrid["normalization-processor"]
    assert processor["normalization"]["technique"] == "min_max"
    assert processor["combination"]["technique"] == "arithmetic_mean"
    assert len(processor["combination"]["parameters"]["weights"]) == 2
    rrf = load_json("rrf-search-pipeline.json")["phase_results_processors"][0]
    assert rrf["score-ranker-processor"]["combination"]["technique"] == "rrf"


def test_replicas_are_set_only_when_chosen() -> None:
    vector = VectorOptions(dimension=3)
    chosen = render_index_template("a", vector, replicas=0)
    assert chosen["template"]["settings"]["index"]["number_of_replicas"] == 0
    default = render_index_template("a", vector)
    assert "number_of_replicas" not in default["template"]["settings"]["index"]
