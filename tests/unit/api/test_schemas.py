from typing import Any

import pytest

from sidecar.api.errors import ApiError
from sidecar.api.schemas import (
    MAX_INDEX_CHARS,
    MAX_QUERY_CHARS,
    RerankExt,
    check_json_media_type,
    parse_json_object,
    parse_rerank_ext,
    parse_search_request,
)
from sidecar.config import Settings

SETTINGS = Settings(default_candidates=50, max_candidates=200)
MINIMAL = {"index": "docs", "query": "what is bm25"}


def search(**fields: Any) -> dict[str, Any]:
    return {**MINIMAL, **fields}


def refused(call: Any, *args: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call(*args)
    return caught.value


def assert_bad_request(error: ApiError, *fragments: str) -> None:
    assert error.status == 400
    assert error.error_type == "illegal_argument_exception"
    for fragment in fragments:
        assert fragment in error.reason


# parse_json_object


def test_parse_json_object_returns_the_object() -> None:
    assert parse_json_object(b'{"index": "docs", "k": 3}') == {"index": "docs", "k": 3}


def test_parse_json_object_accepts_utf8_text() -> None:
    assert parse_json_object('{"query": "café ☕"}'.encode()) == {"query": "café ☕"}


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"not json", b'{"a": 1,}', b"\xff\xfe\x00garbage\x80", b'{"a": "\xc3\x28"}'],
    ids=["empty", "truncated", "text", "trailing-comma", "binary", "invalid-utf8"],
)
def test_parse_json_object_rejects_invalid_json(raw: bytes) -> None:
    error = refused(parse_json_object, raw)
    assert error.status == 400
    assert error.error_type == "parsing_exception"
    assert "not valid JSON" in error.reason


@pytest.mark.parametrize("raw", [b"[]", b'"text"', b"42", b"null", b"true"])
def test_parse_json_object_rejects_non_objects(raw: bytes) -> None:
    error = refused(parse_json_object, raw)
    assert error.status == 400
    assert error.error_type == "parsing_exception"
    assert "must be a JSON object" in error.reason


def test_parse_json_object_rejects_deeply_nested_json_with_400() -> None:
    error = refused(parse_json_object, b'{"a": ' + b"[" * 100_000)
    assert error.status == 400


# parse_search_request: defaults


def test_defaults_fill_everything_but_index_and_query() -> None:
    request = parse_search_request(MINIMAL, SETTINGS)
    assert request.index == "docs"
    assert request.query == "what is bm25"
    assert request.k == 10
    assert request.candidates == SETTINGS.default_candidates == 50
    assert request.fusion == "convex"
    assert request.rerank is True
    assert request.truncation == SETTINGS.truncation
    assert request.weights is None
    assert request.filter is None
    assert request.explain is False


def test_truncation_default_comes_from_settings() -> None:
    settings = Settings(truncation="max_chunk")
    assert parse_search_request(MINIMAL, settings).truncation == "max_chunk"


def test_explicit_values_are_kept() -> None:
    request = parse_search_request(
        search(
            k=5,
            candidates=200,
            fusion="rrf",
            rerank=False,
            truncation="max_chunk",
            weights=[0.3, 0.7],
            filter={"term": {"lang": "en"}},
            explain=True,
        ),
        SETTINGS,
    )
    assert request.k == 5
    assert request.candidates == 200
    assert request.fusion == "rrf"
    assert request.rerank is False
    assert request.truncation == "max_chunk"
    assert request.weights == (0.3, 0.7)
    assert request.filter == {"term": {"lang": "en"}}
    assert request.explain is True


@pytest.mark.parametrize("fusion", ["server", "rrf", "convex"])
def test_every_fusion_is_accepted(fusion: str) -> None:
    assert parse_search_request(search(fusion=fusion), SETTINGS).fusion == fusion


def test_k_may_equal_candidates() -> None:
    request = parse_search_request(search(k=20, candidates=20), SETTINGS)
    assert (request.k, request.candidates) == (20, 20)


def test_k_is_checked_against_the_default_candidates() -> None:
    error = refused(parse_search_request, search(k=51), SETTINGS)
    assert_bad_request(error, "[k] (51)", "[candidates] (50)")


# parse_search_request: index and query


@pytest.mark.parametrize("field", ["index", "query"])
def test_index_and_query_are_required(field: str) -> None:
    body = dict(MINIMAL)
    del body[field]
    assert_bad_request(refused(parse_search_request, body, SETTINGS), f"[{field}] is required")


@pytest.mark.parametrize("field", ["index", "query"])
def test_null_index_or_query_counts_as_missing(field: str) -> None:
    error = refused(parse_search_request, search(**{field: None}), SETTINGS)
    assert_bad_request(error, f"[{field}] is required")


@pytest.mark.parametrize("field", ["index", "query"])
@pytest.mark.parametrize("value", [42, True, ["docs"], {"name": "docs"}])
def test_index_and_query_must_be_strings(field: str, value: Any) -> None:
    error = refused(parse_search_request, search(**{field: value}), SETTINGS)
    assert_bad_request(error, f"[{field}] must be a string")


@pytest.mark.parametrize("field", ["index", "query"])
@pytest.mark.parametrize("value", ["", "   ", "\t\n"])
def test_index_and_query_must_not_be_blank(field: str, value: str) -> None:
    error = refused(parse_search_request, search(**{field: value}), SETTINGS)
    assert_bad_request(error, f"[{field}] must not be empty")


@pytest.mark.parametrize(
    ("field", "limit"), [("index", MAX_INDEX_CHARS), ("query", MAX_QUERY_CHARS)]
)
def test_index_and_query_length_limits(field: str, limit: int) -> None:
    at_limit = parse_search_request(search(**{field: "x" * limit}), SETTINGS)
    assert getattr(at_limit, field) == "x" * limit
    error = refused(parse_search_request, search(**{field: "x" * (limit + 1)}), SETTINGS)
    assert_bad_request(error, f"[{field}] is longer than {limit} characters")


# parse_search_request: integers


@pytest.mark.parametrize("field", ["k", "candidates"])
@pytest.mark.parametrize("value", [True, False, 5.0, "5", None, [5]])
def test_k_and_candidates_must_be_integers(field: str, value: Any) -> None:
    error = refused(parse_search_request, search(**{field: value}), SETTINGS)
    assert_bad_request(error, f"[{field}] must be an integer")


@pytest.mark.parametrize("field", ["k", "candidates"])
@pytest.mark.parametrize("value", [0, -1])
def test_k_and_candidates_must_be_positive(field: str, value: int) -> None:
    error = refused(parse_search_request, search(**{field: value}), SETTINGS)
    assert_bad_request(error, f"[{field}] must be at least 1")


def test_k_above_candidates_is_refused() -> None:
    error = refused(parse_search_request, search(k=11, candidates=10), SETTINGS)
    assert_bad_request(error, "[k] (11) must not exceed [candidates] (10)")


def test_candidates_above_the_maximum_is_refused() -> None:
    assert parse_search_request(search(candidates=200), SETTINGS).candidates == 200
    error = refused(parse_search_request, search(candidates=201), SETTINGS)
    assert_bad_request(error, "[candidates] is 201", "maximum 200")


# parse_search_request: enums and booleans


@pytest.mark.parametrize("value", ["hybrid", "RRF", "", None, 1, ["rrf"]])
def test_unknown_fusion_is_refused(value: Any) -> None:
    error = refused(parse_search_request, search(fusion=value), SETTINGS)
    assert_bad_request(error, "[fusion] must be one of server, rrf, convex")


@pytest.mark.parametrize("value", ["last", "First", None, 0])
def test_unknown_truncation_is_refused(value: Any) -> None:
    error = refused(parse_search_request, search(truncation=value), SETTINGS)
    assert_bad_request(error, "[truncation] must be one of first, max_chunk, best_passage")


@pytest.mark.parametrize("field", ["rerank", "explain"])
@pytest.mark.parametrize("value", [1, 0, "true", None])
def test_rerank_and_explain_must_be_booleans(field: str, value: Any) -> None:
    error = refused(parse_search_request, search(**{field: value}), SETTINGS)
    assert_bad_request(error, f"[{field}] must be true or false")


# parse_search_request: weights


@pytest.mark.parametrize(
    ("weights", "expected"),
    [([0.3, 0.7], (0.3, 0.7)), ([1, 0], (1.0, 0.0)), ([0, 2], (0.0, 2.0))],
)
def test_valid_weights_become_a_float_pair(
    weights: list[Any], expected: tuple[float, float]
) -> None:
    parsed = parse_search_request(search(weights=weights), SETTINGS).weights
    assert parsed == expected
    assert parsed is not None
    assert all(type(w) is float for w in parsed)


@pytest.mark.parametrize(
    "weights",
    [
        [],
        [0.5],
        [0.2, 0.3, 0.5],
        (0.5, 0.5),
        {"lexical": 0.5, "vector": 0.5},
        0.5,
        "0.5,0.5",
        [-0.1, 1.0],
        [0, 0],
        [0.0, 0.0],
        [float("nan"), 1.0],
        [float("inf"), 1.0],
        [1.0, float("-inf")],
        [True, 1.0],
        [1.0, False],
        ["0.5", "0.5"],
        [None, 1.0],
    ],
    ids=lambda w: repr(w),
)
def test_invalid_weights_are_refused(weights: Any) -> None:
    error = refused(parse_search_request, search(weights=weights), SETTINGS)
    assert_bad_request(error, "[weights] must be [lexical, vector]")


def test_weights_with_an_integer_too_large_for_a_float_are_refused() -> None:
    body = parse_json_object(
        b'{"index": "docs", "query": "q", "weights": [1' + b"0" * 400 + b", 1]}"
    )
    error = refused(parse_search_request, body, SETTINGS)
    assert_bad_request(error, "[weights]")


# parse_search_request: filter


@pytest.mark.parametrize(
    "clause",
    [
        {"term": {"lang": "en"}},
        {"bool": {"must": [{"term": {"a": 1}}, {"range": {"b": {"gt": 2}}}]}},
    ],
)
def test_one_clause_filter_is_kept(clause: dict[str, Any]) -> None:
    assert parse_search_request(search(filter=clause), SETTINGS).filter == clause


@pytest.mark.parametrize(
    "clause",
    [
        {},
        {"term": {"lang": "en"}, "range": {"year": {"gte": 2000}}},
        [{"term": {"lang": "en"}}],
        "lang:en",
        1,
        True,
    ],
    ids=["empty", "two-clauses", "list", "string", "int", "bool"],
)
def test_filter_must_be_one_clause_object(clause: Any) -> None:
    error = refused(parse_search_request, search(filter=clause), SETTINGS)
    assert_bad_request(error, "[filter] must be one OpenSearch query clause")


# parse_search_request: unknown fields


def test_unknown_fields_are_listed_sorted_with_the_allowed_ones() -> None:
    error = refused(parse_search_request, search(size=10, from_=0, Query="x"), SETTINGS)
    assert_bad_request(error, "unknown field(s) Query, from_, size;", "allowed: candidates")
    for allowed in ("index", "query", "k", "filter", "fusion", "weights", "rerank", "explain"):
        assert allowed in error.reason


def test_unknown_fields_are_reported_before_other_problems() -> None:
    error = refused(parse_search_request, {"typo": 1}, SETTINGS)
    assert_bad_request(error, "unknown field(s) typo")


# parse_rerank_ext


def test_rerank_ext_defaults() -> None:
    ext = parse_rerank_ext({"query_context": {"query_text": "what is bm25"}}, SETTINGS)
    assert ext == RerankExt(
        query_text="what is bm25",
        window=SETTINGS.default_candidates,
        document_fields=None,
        truncation=SETTINGS.truncation,
        rerank_depth=None,
    )


def test_rerank_ext_explicit_values() -> None:
    ext = parse_rerank_ext(
        {"query_context": {"query_text": "q"}, "window": 200, "document_fields": ["body"]},
        SETTINGS,
    )
    assert ext == RerankExt(
        query_text="q",
        window=200,
        document_fields=("body",),
        truncation=SETTINGS.truncation,
        rerank_depth=None,
    )


@pytest.mark.parametrize("ext", [None, [], "rerank", 1])
def test_rerank_ext_must_be_an_object(ext: Any) -> None:
    assert_bad_request(refused(parse_rerank_ext, ext, SETTINGS), "[ext.rerank] must be an object")


@pytest.mark.parametrize(
    "ext",
    [{}, {"query_context": None}, {"query_context": "q"}, {"query_context": ["q"]}],
    ids=["missing", "null", "string", "list"],
)
def test_rerank_ext_needs_a_query_context_object(ext: dict[str, Any]) -> None:
    error = refused(parse_rerank_ext, ext, SETTINGS)
    assert_bad_request(error, "[ext.rerank.query_context] must be an object with [query_text]")


def test_rerank_ext_needs_query_text() -> None:
    error = refused(parse_rerank_ext, {"query_context": {}}, SETTINGS)
    assert_bad_request(error, "[ext.rerank.query_context.query_text] is required")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (7, "must be a string"),
        ("   ", "must not be empty"),
        ("x" * (MAX_QUERY_CHARS + 1), f"is longer than {MAX_QUERY_CHARS} characters"),
    ],
)
def test_rerank_ext_query_text_is_validated(value: Any, message: str) -> None:
    error = refused(parse_rerank_ext, {"query_context": {"query_text": value}}, SETTINGS)
    assert_bad_request(error, f"[ext.rerank.query_context.query_text] {message}")


def test_rerank_ext_window_above_the_maximum_is_refused() -> None:
    ext = {"query_context": {"query_text": "q"}, "window": 201}
    assert_bad_request(refused(parse_rerank_ext, ext, SETTINGS), "[ext.rerank.window] is 201")


@pytest.mark.parametrize(
    ("window", "message"),
    [(0, "must be at least 1"), (True, "must be an integer"), (2.5, "must be an integer")],
)
def test_rerank_ext_window_must_be_a_positive_integer(window: Any, message: str) -> None:
    ext = {"query_context": {"query_text": "q"}, "window": window}
    assert_bad_request(refused(parse_rerank_ext, ext, SETTINGS), f"[ext.rerank.window] {message}")


@pytest.mark.parametrize(
    "fields",
    [
        [],
        "title",
        ["title", ""],
        ["title", 3],
        None,
        {"title": True},
        [["title"]],
        ["a..b"],
        [" title"],
        ["f"] * 33,
    ],
    ids=[
        "empty",
        "string",
        "empty-name",
        "non-string",
        "null",
        "object",
        "nested",
        "empty-path-part",
        "padded",
        "too-many",
    ],
)
def test_rerank_ext_document_fields_must_be_a_non_empty_list_of_names(fields: Any) -> None:
    ext = {"query_context": {"query_text": "q"}, "document_fields": fields}
    error = refused(parse_rerank_ext, ext, SETTINGS)
    assert_bad_request(
        error, "[ext.rerank.document_fields] must be a non-empty list of at most 32 field names"
    )


def test_duplicate_keys_are_refused_as_opensearch_does() -> None:
    with pytest.raises(ApiError, match="Duplicate field 'query'") as raised:
        parse_json_object(b'{"index": "i", "query": "a", "query": "b"}')
    assert raised.value.status == 400
    with pytest.raises(ApiError, match="Duplicate field 'k'"):
        parse_json_object(b'{"nested": {"k": 1, "k": 2}}')


def test_numbers_longer_than_jacksons_limit_are_a_400_not_a_500() -> None:
    digits = "9" * 4301  # beyond Python's int-string limit too
    with pytest.raises(
        ApiError, match=r"Number value length \(4301\) exceeds the maximum allowed \(1000\)"
    ):
        parse_json_object(f'{{"k": {digits}}}'.encode())
    with pytest.raises(ApiError, match="exceeds the maximum"):
        parse_json_object(f'{{"k": 1.{"5" * 1000}}}'.encode())
    assert parse_json_object(f'{{"k": {"9" * 1000}}}'.encode())["k"] == int("9" * 1000)


def test_an_unpaired_surrogate_in_the_query_is_a_400() -> None:
    body = parse_json_object(b'{"index": "i", "query": "caf\\ud800"}')
    with pytest.raises(ApiError, match=r"\[query\] contains an unpaired UTF-16 surrogate"):
        parse_search_request(body, Settings())
    paired = parse_json_object(b'{"index": "i", "query": "\\ud83d\\ude00 smile"}')
    assert parse_search_request(paired, Settings()).query == "\U0001f600 smile"


@pytest.mark.parametrize(
    ("content_type", "accepted"),
    [
        ("application/json", True),
        ("application/json; charset=UTF-8", True),
        ("Application/JSON", True),
        ("application/vnd.opensearch+json", True),
        ("text/plain", False),
        ("application/x-www-form-urlencoded", False),
        (None, False),
    ],
)
def test_only_json_bodies_are_read_as_opensearch_does(
    content_type: str | None, accepted: bool
) -> None:
    if accepted:
        check_json_media_type(content_type)
        return
    with pytest.raises(ApiError, match="Content-Type header") as raised:
        check_json_media_type(content_type)
    assert raised.value.status == 406


# rerank_depth and truncation, native and ext.rerank


def test_rerank_depth_defaults_to_the_setting_and_none_reranks_all() -> None:
    assert parse_search_request(MINIMAL, SETTINGS).rerank_depth is None
    settings = Settings(rerank_depth=20)
    assert parse_search_request(MINIMAL, settings).rerank_depth == 20
    assert parse_search_request(search(rerank_depth=5), settings).rerank_depth == 5


def test_rerank_depth_deeper_than_the_candidates_is_allowed() -> None:
    request = parse_search_request(search(candidates=10, rerank_depth=50), SETTINGS)
    assert (request.candidates, request.rerank_depth) == (10, 50)


@pytest.mark.parametrize(
    ("depth", "message"),
    [
        (0, "[rerank_depth] must be at least 1"),
        (-3, "[rerank_depth] must be at least 1"),
        ("10", "[rerank_depth] must be an integer"),
        (True, "[rerank_depth] must be an integer"),
        (201, "[rerank_depth] is 201, above the maximum 200"),
    ],
)
def test_a_bad_rerank_depth_is_refused(depth: Any, message: str) -> None:
    error = refused(parse_search_request, search(rerank_depth=depth), SETTINGS)
    assert_bad_request(error, message)


def test_best_passage_is_a_truncation() -> None:
    request = parse_search_request(search(truncation="best_passage"), SETTINGS)
    assert request.truncation == "best_passage"


def test_rerank_ext_takes_truncation_and_depth_with_defaults_from_settings() -> None:
    context = {"query_context": {"query_text": "what is bm25"}}
    settings = Settings(truncation="max_chunk", rerank_depth=30)
    defaults = parse_rerank_ext(context, settings)
    assert (defaults.truncation, defaults.rerank_depth) == ("max_chunk", 30)
    given = parse_rerank_ext({**context, "truncation": "best_passage", "rerank_depth": 7}, settings)
    assert (given.truncation, given.rerank_depth) == ("best_passage", 7)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("truncation", "last", "[ext.rerank.truncation] must be one of"),
        ("rerank_depth", 0, "[ext.rerank.rerank_depth] must be at least 1"),
        ("rerank_depth", 1.5, "[ext.rerank.rerank_depth] must be an integer"),
    ],
)
def test_rerank_ext_refuses_a_bad_truncation_or_depth(field: str, value: Any, message: str) -> None:
    ext = {"query_context": {"query_text": "q"}, field: value}
    assert_bad_request(refused(parse_rerank_ext, ext, SETTINGS), message)
