"""`filter_path` as OpenSearch applies it (each case checked against a real node's answer)."""

from typing import Any

import pytest

from sidecar.api.filter_path import apply_filter_path, parse_filter_path

RESPONSE: dict[str, Any] = {
    "took": 5,
    "_shards": {"total": 1, "successful": 1},
    "hits": {
        "total": {"value": 2, "relation": "eq"},
        "max_score": None,
        "hits": [
            {
                "_id": "1",
                "_score": None,
                "_source": {"title": "a", "tags": ["x"], "empty": {}, "a.b": 1, "a": {"b": 2}},
            },
            {"_id": "2", "_score": None, "_source": {"title": "c", "tags": []}},
        ],
    },
}


def filtered(expression: str) -> dict[str, Any]:
    return apply_filter_path(RESPONSE, parse_filter_path(expression))


@pytest.mark.parametrize("expression", ["", ",,", " , ", "-.", "**"])
def test_an_expression_that_filters_nothing_keeps_the_whole_response(expression: str) -> None:
    assert filtered(expression) == RESPONSE


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("took", {"took": 5}),
        (" took ,took", {"took": 5}),
        ("hits.hits._id", {"hits": {"hits": [{"_id": "1"}, {"_id": "2"}]}}),
        ("hits.hits.*id", {"hits": {"hits": [{"_id": "1"}, {"_id": "2"}]}}),
        ("hits.hits._source.a\\.b", {"hits": {"hits": [{"_source": {"a.b": 1}}]}}),
        ("hits.hits._source.a.b", {"hits": {"hits": [{"_source": {"a": {"b": 2}}}]}}),
        ("hits.hits._source.a*b", {"hits": {"hits": [{"_source": {"a.b": 1}}]}}),
        ("hits.hits.", {"hits": {"hits": RESPONSE["hits"]["hits"]}}),
        ("*.total", {"_shards": {"total": 1}, "hits": {"total": {"value": 2, "relation": "eq"}}}),
        ("**.b", {"hits": {"hits": [{"_source": {"a": {"b": 2}}}]}}),
        ("hits.max_score", {"hits": {"max_score": None}}),
        ("hits.hits._source.empty", {"hits": {"hits": [{"_source": {"empty": {}}}]}}),
    ],
)
def test_includes_keep_the_matched_values_and_the_path_to_them(
    expression: str, expected: dict[str, Any]
) -> None:
    assert filtered(expression) == expected


@pytest.mark.parametrize(
    "expression",
    ["no_such_field", "took.below_a_scalar", "hits.hits._source.tags.x", "**.took", "hits..hits"],
)
def test_includes_that_match_nothing_leave_an_empty_object(expression: str) -> None:
    assert filtered(expression) == {}


def test_wildcards_match_only_stars_not_question_marks() -> None:
    assert filtered("hits.hits._i?") == {}
    assert filtered("_sh*ds.tot*") == {"_shards": {"total": 1}}


def test_excludes_drop_the_matched_values_and_what_they_leave_empty() -> None:
    assert filtered("-took,-_shards,-hits.total,-hits.max_score,-hits.hits._source") == {
        "hits": {"hits": [{"_id": "1", "_score": None}, {"_id": "2", "_score": None}]}
    }
    assert filtered("-hits.hits._source.*") == {
        "took": 5,
        "_shards": {"total": 1, "successful": 1},
        "hits": {
            "total": {"value": 2, "relation": "eq"},
            "max_score": None,
            "hits": [{"_id": "1", "_score": None}, {"_id": "2", "_score": None}],
        },
    }
    assert filtered("-**") == {}


def test_excludes_keep_scalars_but_drop_empty_values_on_their_way() -> None:
    """A value an exclusion only passes through is kept, unless it is an empty object or array:
    the cluster never writes those there."""
    hits = filtered("-hits.hits._source.*.below")["hits"]["hits"]
    assert hits[0]["_source"] == {"title": "a", "tags": ["x"], "a.b": 1, "a": {"b": 2}}
    assert hits[1]["_source"] == {"title": "c"}
    assert filtered("-took.below_a_scalar") == RESPONSE


def test_includes_are_applied_before_excludes() -> None:
    assert filtered("hits.hits._id,hits.hits._score,-hits.hits._score") == {
        "hits": {"hits": [{"_id": "1"}, {"_id": "2"}]}
    }
    assert filtered("hits.total,-hits") == {}
    assert filtered("_shards,-_shards.total") == {"_shards": {"successful": 1}}


def test_the_response_itself_is_not_changed() -> None:
    before = repr(RESPONSE)
    filtered("-hits.hits._source.title")
    assert repr(RESPONSE) == before


@pytest.mark.parametrize("expression", ["-", " - ", "-,took", "took,-"])
def test_an_exclusion_of_nothing_is_refused_in_the_clusters_words(expression: str) -> None:
    with pytest.raises(ValueError, match=r"^filters cannot be null or empty$"):
        parse_filter_path(expression)
