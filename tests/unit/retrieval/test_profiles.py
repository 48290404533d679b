"""Profile resolution from config tables, mappings and defaults; document text; filter fields."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.config import ProfileConfig, Settings, SettingsError, parse_profiles
from sidecar.retrieval.profiles import (
    MappingInfo,
    ProfileError,
    build_profile,
    check_filter,
    filter_fields,
    match_profile,
    read_text,
)
from sidecar.retrieval.queries import build_lexical_query, build_vector_query, combine_filters

MODEL = "mini"


def mapping(properties: dict[str, Any], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    mappings: dict[str, Any] = {"properties": properties}
    if meta is not None:
        mappings["_meta"] = {"sidecar": meta}
    return {"idx": {"mappings": mappings}}


FOREIGN = mapping(
    {
        "headline": {"type": "text"},
        "content": {"properties": {"en": {"type": "text"}, "lang": {"type": "keyword"}}},
        "tags": {"type": "keyword"},
        "vec": {"type": "knn_vector", "dimension": 384},
        "other_vec": {"type": "knn_vector", "dimension": 768},
        "comments": {"type": "nested", "properties": {"body": {"type": "text"}}},
        "opaque": {"type": "object", "enabled": False},
        "stored_only": {"type": "keyword", "index": False},
    }
)


def resolve(
    response: dict[str, Any] | None,
    configured: dict[str, Any] | None = None,
    *,
    allow_lexical_only: bool = False,
    dimensions: dict[str, int] | None = None,
) -> Any:
    configs = parse_profiles({"idx": configured}) if configured is not None else {}
    return build_profile(
        "idx",
        match_profile(configs, "idx"),
        MappingInfo.from_response(response) if response is not None else None,
        local_model=MODEL,
        local_dimensions=dimensions or {MODEL: 384},
        allow_lexical_only=allow_lexical_only,
    )


def test_discovery_finds_text_fields_and_the_vector_of_the_encoders_dimension() -> None:
    profile = resolve(FOREIGN)
    assert profile.lexical_fields == ("headline", "content.en")  # nested and opaque left out
    assert (profile.lexical_type, profile.tie_breaker) == ("best_fields", 0.5)
    assert (profile.vector_field, profile.embedding, profile.dimension) == ("vec", "local", 384)
    assert profile.document_fields == ("headline", "content.en")
    assert profile.source_excludes == ("vec",)
    assert profile.embed_on_write is False
    assert profile.origins["lexical.fields"] == "discovered"
    assert profile.origins["vector"] == "discovered"
    assert profile.origins["embed_on_write"] == "default"


def test_filterable_fields_exclude_vectors_opaque_objects_and_unindexed_fields() -> None:
    fields = resolve(FOREIGN).filterable_fields
    assert {"headline", "content.lang", "tags", "comments.body", "_id"} <= fields
    assert not {"vec", "opaque.x", "stored_only"} & fields


def test_sidecar_index_meta_turns_embedding_on_write_on() -> None:
    response = mapping(
        {
            "title": {"type": "text"},
            "text": {"type": "text"},
            "embedding": {"type": "knn_vector", "dimension": 384},
        },
        meta={"embed_on_write": True, "text_fields": ["title", "text"]},
    )
    profile = resolve(response)
    assert profile.embed_on_write is True
    assert profile.text_fields == ("title", "text")
    assert profile.origins["embed_on_write"] == "discovered"


def test_config_overrides_each_part_and_says_so() -> None:
    profile = resolve(
        FOREIGN,
        {
            "lexical": {"fields": ["headline^2", "content.en"], "tie_breaker": 0.3},
            "vector": {"field": "vec"},
            "rerank": {"document_fields": ["headline"], "max_chars_per_field": 100},
            "embed_on_write": True,
            "default_filter": {"term": {"content.lang": "en"}},
        },
    )
    assert profile.lexical_fields == ("headline^2", "content.en")
    assert profile.tie_breaker == 0.3
    assert profile.document_fields == ("headline",)
    assert profile.text_fields == ("headline",), "embedded on write: the rerank fields by default"
    assert profile.embed_on_write is True
    assert profile.origins["lexical.fields"] == "config"
    assert profile.origins["rerank.document_fields"] == "config"
    assert profile.origins["default_filter"] == "config"


def test_configured_dimension_disagreeing_with_the_mapping_names_both_numbers() -> None:
    with pytest.raises(ProfileError, match=r"dimension 768.*produces 384"):
        resolve(FOREIGN, {"vector": {"field": "other_vec"}})


def test_a_second_local_model_matches_the_other_vector_field() -> None:
    profile = resolve(
        FOREIGN,
        {"vector": {"field": "other_vec", "model": "big"}},
        dimensions={MODEL: 384, "big": 768},
    )
    assert (profile.vector_field, profile.model, profile.dimension) == ("other_vec", "big", 768)


def test_configured_field_missing_from_the_mapping_lists_what_is_there() -> None:
    with pytest.raises(ProfileError, match=r"'nope'.*vec \(knn_vector, dimension 384\)"):
        resolve(FOREIGN, {"vector": {"field": "nope"}})


def test_no_usable_vector_field_is_refused_naming_what_was_found() -> None:
    response = mapping({"body": {"type": "text"}, "v": {"type": "knn_vector", "dimension": 8}})
    with pytest.raises(ProfileError, match=r"no knn_vector field of dimension 384.*v \("):
        resolve(response)
    allowed = resolve(response, allow_lexical_only=True)
    assert allowed.embedding == "none"
    assert "dimension 384" in (allowed.lexical_only_reason or "")


def test_two_candidate_vector_fields_are_ambiguous() -> None:
    response = mapping(
        {
            "body": {"type": "text"},
            "a": {"type": "knn_vector", "dimension": 384},
            "b": {"type": "knn_vector", "dimension": 384},
        }
    )
    with pytest.raises(ProfileError, match=r"several knn_vector fields.*a, b"):
        resolve(response)


def test_semantic_field_is_queried_neurally_with_its_model() -> None:
    response = mapping({"body": {"type": "text"}, "sem": {"type": "semantic", "model_id": "m-1"}})
    profile = resolve(response)
    assert (profile.vector_field, profile.embedding, profile.model) == ("sem", "neural", "m-1")
    assert profile.embed_on_write is False, "the cluster embeds semantic fields itself"
    query = build_vector_query(profile, "q", None, 5)
    assert query == {"neural": {"sem": {"query_text": "q", "k": 5, "model_id": "m-1"}}}


def test_neural_profile_sends_the_clusters_model_id_and_no_vector() -> None:
    profile = resolve(FOREIGN, {"vector": {"field": "vec", "embedding": "neural", "model_id": "x"}})
    query = build_vector_query(profile, "text", None, 7, {"term": {"tags": "a"}})
    assert query == {
        "neural": {
            "vec": {
                "query_text": "text",
                "k": 7,
                "model_id": "x",
                "filter": {"term": {"tags": "a"}},
            }
        }
    }


def test_lexical_query_follows_the_profile() -> None:
    profile = resolve(FOREIGN, {"lexical": {"type": "most_fields", "tie_breaker": None}})
    assert build_lexical_query(profile, "q") == {
        "multi_match": {"query": "q", "fields": ["headline", "content.en"], "type": "most_fields"}
    }


def test_default_filter_is_anded_with_the_requests() -> None:
    profile = resolve(FOREIGN, {"default_filter": {"term": {"tags": "public"}}})
    assert combine_filters(profile, None) == {"term": {"tags": "public"}}
    assert combine_filters(profile, {"term": {"content.lang": "en"}}) == {
        "bool": {"filter": [{"term": {"tags": "public"}}, {"term": {"content.lang": "en"}}]}
    }


def test_vector_field_must_be_mapped_alike_in_every_index() -> None:
    response = {
        "a": {
            "mappings": {
                "properties": {"t": {"type": "text"}, "v": {"type": "knn_vector", "dimension": 384}}
            }
        },
        "b": {
            "mappings": {
                "properties": {"t": {"type": "text"}, "v": {"type": "knn_vector", "dimension": 768}}
            }
        },
    }
    assert MappingInfo.from_response(response).vector_fields == ()


def generation(index: str, vector: dict[str, Any] | None, **text: str) -> dict[str, Any]:
    properties: dict[str, Any] = {name: {"type": kind} for name, kind in text.items()}
    if vector is not None:
        properties["v"] = vector
    return {index: {"mappings": {"properties": properties}}}


KNN_384 = {"type": "knn_vector", "dimension": 384, "method": {"engine": "lucene"}}


def test_indexes_behind_an_alias_that_agree_on_the_vector_serve_with_the_union_of_text() -> None:
    # Same field and dimension (engines may differ); the newer generation added a text field.
    response = {
        **generation("docs-000001", KNN_384, title="text"),
        **generation(
            "docs-000002", {**KNN_384, "method": {"engine": "faiss"}}, title="text", body="text"
        ),
    }
    info = MappingInfo.from_response(response)
    assert info.indexes == ("docs-000001", "docs-000002")
    assert info.disagreements == ()
    profile = build_profile(
        "docs",
        None,
        info,
        local_model=MODEL,
        local_dimensions={MODEL: 384},
        allow_lexical_only=False,
    )
    assert (profile.vector_field, profile.dimension) == ("v", 384)
    assert profile.lexical_fields == ("title", "body")


@pytest.mark.parametrize(
    ("older", "said"),
    [
        ({"type": "knn_vector", "dimension": 768}, "docs-000001: knn_vector, dimension 768"),
        (None, "docs-000001: not mapped"),
    ],
    ids=["other-dimension", "missing"],
)
def test_indexes_that_disagree_on_the_vector_are_refused_naming_each_index(
    older: dict[str, Any] | None, said: str
) -> None:
    response = {
        **generation("docs-000001", older, title="text"),
        **generation("docs-000002", KNN_384, title="text"),
    }
    info = MappingInfo.from_response(response)
    with pytest.raises(ProfileError) as refused:
        build_profile(
            "docs-*",
            None,
            info,
            local_model=MODEL,
            local_dimensions={MODEL: 384},
            allow_lexical_only=False,
        )
    message = str(refused.value)
    assert said in message
    assert "docs-000002: knn_vector, dimension 384" in message
    assert "the indexes behind 'docs-*' do not map these vector fields alike" in message
    assert "search only the indexes that agree" in message
    configured = parse_profiles({"docs-*": {"vector": {"field": "v"}}})
    with pytest.raises(ProfileError, match=said):
        build_profile(
            "docs-*",
            match_profile(configured, "docs-*"),
            info,
            local_model=MODEL,
            local_dimensions={MODEL: 384},
            allow_lexical_only=False,
        )


def test_a_pattern_that_matches_no_index_says_so() -> None:
    with pytest.raises(ProfileError, match="'nothing-\\*' matches no index"):
        build_profile(
            "nothing-*",
            None,
            MappingInfo.from_response({}),
            local_model=MODEL,
            local_dimensions={MODEL: 384},
            allow_lexical_only=True,
        )


def test_exact_name_wins_over_patterns_and_patterns_go_in_file_order() -> None:
    configs = parse_profiles({"logs-*": {}, "logs-a*": {}, "logs-app": {}})
    assert match_profile(configs, "logs-app") is not None
    assert match_profile(configs, "logs-app")[0] == "logs-app"  # type: ignore[index]
    assert match_profile(configs, "logs-abc")[0] == "logs-*"  # type: ignore[index]
    assert match_profile(configs, "metrics") is None


@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        ({"lexical": {"tie_breaker": 2}}, "lexical.tie_breaker"),
        ({"vector": {"embedding": "remote"}}, "vector.embedding"),
        ({"rerank": {"document_fields": []}}, "rerank.document_fields"),
        ({"typo": 1}, "typo"),
        ({"default_filter": {"term": {}, "range": {}}}, "one query clause"),
    ],
)
def test_bad_profile_tables_name_the_field(table: dict[str, Any], fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment):
        parse_profiles({"idx": table})


def test_profiles_come_from_the_config_file(tmp_path: Any) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_text(
        '[profiles."news-*"]\nlexical.fields = ["headline", "body"]\n'
        'vector.field = "vec"\nrerank.document_fields = ["headline", "body"]\n'
    )
    settings = Settings.from_env({"SIDECAR_CONFIG_FILE": str(path)})
    assert settings.profiles["news-*"] == ProfileConfig.model_validate(
        {
            "lexical": {"fields": ["headline", "body"]},
            "vector": {"field": "vec"},
            "rerank": {"document_fields": ["headline", "body"]},
        }
    )
    assert settings.redacted()["profiles"]["news-*"]["vector"] == {"field": "vec"}


def test_read_text_follows_dotted_paths_arrays_and_dotted_keys() -> None:
    source = {
        "title": "T",
        "content": [{"en": "first"}, {"en": "second"}],
        "meta.summary": "flat",
        "n": 3,
        "flag": True,
    }
    assert read_text(source, ["title", "content.en", "meta.summary", "n", "flag", "x"]) == (
        "T first second flat 3"
    )
    assert read_text({"title": "abcdef"}, ["title"], max_chars_per_field=3) == "abc"
    assert read_text({}, ["title"]) == ""


def test_filter_fields_of_compound_clauses() -> None:
    clause = {
        "bool": {
            "must": [{"term": {"a": 1}}, {"range": {"b": {"gte": 1}, "boost": 2}}],
            "should": {"exists": {"field": "c"}},
            "must_not": [{"nested": {"path": "n", "query": {"match": {"n.x": "y"}}}}],
            "filter": [{"match_all": {}}, {"wildcard": {"d*": "e"}}],
        }
    }
    assert sorted(filter_fields(clause)) == ["a", "b", "c", "n.x"]


def test_filter_on_a_field_the_index_does_not_search_is_refused_by_name() -> None:
    profile = resolve(FOREIGN)
    check_filter(profile, "idx", {"term": {"content.lang": "en"}})
    with pytest.raises(ProfileError, match=r"'opaque.kind'.*filterable fields: "):
        check_filter(profile, "idx", {"term": {"opaque.kind": "x"}})
    with pytest.raises(ProfileError, match="'stored_only'"):
        check_filter(profile, "idx", {"bool": {"filter": [{"term": {"stored_only": "x"}}]}})


def test_read_text_replaces_unpaired_surrogates_for_the_tokenizer() -> None:
    assert read_text({"t": "caf\ud800 ok \U0001f600"}, ["t"]) == "caf\ufffd ok \U0001f600"
