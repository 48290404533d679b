"""Request validation for the native API and the `_search` interception: everything a client sends
is checked here, with 400s that say which field is wrong and why."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast, get_args

from sidecar.api.errors import ApiError, bad_request
from sidecar.config import Settings, Truncation
from sidecar.pipeline import SearchRequest
from sidecar.retrieval.first_stage import FUSIONS
from sidecar.retrieval.profiles import LONE_SURROGATE

MAX_QUERY_CHARS = 4096
MAX_INDEX_CHARS = 255
MAX_DOCUMENT_FIELDS = 32
MAX_FIELD_CHARS = 512
_NATIVE_FIELDS = frozenset(
    {
        "index",
        "query",
        "k",
        "candidates",
        "filter",
        "fusion",
        "weights",
        "rerank",
        "truncation",
        "rerank_depth",
        "explain",
        "rerank_cache",
        "document_fields",
    }
)


JSON_MEDIA_TYPES = frozenset({"application/json", "application/vnd.opensearch+json"})
# Jackson's default StreamReadConstraints.maxNumberLength, which OpenSearch's parser enforces.
MAX_NUMBER_CHARS = 1000


def load_json(raw: bytes) -> Any:
    """JSON as OpenSearch's parser reads it: a duplicate key or a number longer than Jackson's
    limit is a 400 (Python would keep the last key, and fail on long integers with a ValueError).

    Raises ApiError, json.JSONDecodeError, UnicodeDecodeError and RecursionError."""
    return json.loads(
        raw,
        object_pairs_hook=_unique_keys,
        parse_int=lambda text: int(_bounded_number(text)),
        parse_float=lambda text: float(_bounded_number(text)),
    )


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ApiError(400, "parsing_exception", f"Duplicate field '{key}'")
        seen[key] = value
    return seen


def _bounded_number(text: str) -> str:
    if len(text) > MAX_NUMBER_CHARS:
        raise ApiError(
            400,
            "parsing_exception",
            f"Number value length ({len(text)}) exceeds the maximum allowed ({MAX_NUMBER_CHARS})",
        )
    return text


def is_json_media_type(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() in JSON_MEDIA_TYPES


def check_json_media_type(content_type: str | None) -> None:
    """OpenSearch refuses a body of any other media type with a 406; so does the native API."""
    if not is_json_media_type(content_type):
        reason = (
            f"Content-Type header [{content_type}] is not supported"
            if content_type
            else "Content-Type header is missing"
        )
        raise ApiError(406, "media_type_header_exception", reason)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = load_json(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError(
            400, "parsing_exception", f"request body is not valid JSON: {error}"
        ) from None
    except RecursionError:
        raise ApiError(400, "parsing_exception", "request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "parsing_exception", "request body must be a JSON object")
    return body


def parse_search_request(body: Mapping[str, Any], settings: Settings) -> SearchRequest:
    unknown = sorted(set(body) - _NATIVE_FIELDS)
    if unknown:
        raise bad_request(
            f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_NATIVE_FIELDS))}"
        )
    index = _string(body, "index", MAX_INDEX_CHARS)
    if index is None:
        raise bad_request("[index] is required")
    query = _string(body, "query", MAX_QUERY_CHARS)
    if query is None:
        raise bad_request("[query] is required")
    k = _integer(body, "k", 10)
    candidates = _integer(body, "candidates", settings.default_candidates)
    if candidates > settings.max_candidates:
        raise bad_request(
            f"[candidates] is {candidates}, above the maximum {settings.max_candidates}"
        )
    if k > candidates:
        raise bad_request(f"[k] ({k}) must not exceed [candidates] ({candidates})")
    fusion = body.get("fusion", "convex")
    if fusion not in FUSIONS:
        raise bad_request(f"[fusion] must be one of {', '.join(FUSIONS)}")
    filter_clause = body.get("filter")
    if filter_clause is not None and not (
        isinstance(filter_clause, dict) and len(filter_clause) == 1
    ):
        raise bad_request(
            '[filter] must be one OpenSearch query clause, e.g. {"term": {"lang": "en"}}'
        )
    return SearchRequest(
        index=index,
        query=query,
        k=k,
        candidates=candidates,
        fusion=fusion,
        rerank=_boolean(body, "rerank", True),
        truncation=_truncation(body, settings),
        rerank_depth=_rerank_depth(body, settings),
        weights=_weights(body.get("weights")),
        filter=filter_clause,
        explain=_boolean(body, "explain", False),
        rerank_cache=_boolean(body, "rerank_cache", True),
        document_fields=_field_names(body, "document_fields"),
    )


@dataclass(frozen=True)
class RerankExt:
    """`ext.rerank` of an intercepted `_search`: OpenSearch's rerank-processor shape plus `window`."""

    query_text: str
    window: int
    # None: the index profile's document fields.
    document_fields: tuple[str, ...] | None
    truncation: Truncation
    rerank_depth: int | None


def parse_rerank_ext(ext: Any, settings: Settings) -> RerankExt:
    if not isinstance(ext, dict):
        raise bad_request("[ext.rerank] must be an object")
    context = ext.get("query_context")
    if not isinstance(context, dict):
        raise bad_request("[ext.rerank.query_context] must be an object with [query_text]")
    query_text = _string(
        context, "query_text", MAX_QUERY_CHARS, "ext.rerank.query_context.query_text"
    )
    if query_text is None:
        raise bad_request("[ext.rerank.query_context.query_text] is required")
    window = _integer(ext, "window", settings.default_candidates, "ext.rerank.window")
    if window > settings.max_candidates:
        raise bad_request(
            f"[ext.rerank.window] is {window}, above the maximum {settings.max_candidates}"
        )
    fields = _field_names(ext, "document_fields", "ext.rerank.document_fields")
    return RerankExt(
        query_text=query_text,
        window=window,
        document_fields=fields,
        truncation=_truncation(ext, settings, "ext.rerank.truncation"),
        rerank_depth=_rerank_depth(ext, settings, "ext.rerank.rerank_depth"),
    )


def _truncation(
    body: Mapping[str, Any], settings: Settings, label: str = "truncation"
) -> Truncation:
    truncation = body.get("truncation", settings.truncation)
    if truncation not in get_args(Truncation):
        raise bad_request(f"[{label}] must be one of {', '.join(get_args(Truncation))}")
    return cast(Truncation, truncation)


def _rerank_depth(
    body: Mapping[str, Any], settings: Settings, label: str = "rerank_depth"
) -> int | None:
    """How many of the first candidates are reranked; None: all. Deeper than the candidates is
    allowed (it reranks them all), so one default suits requests of any depth."""
    if "rerank_depth" not in body:
        return settings.rerank_depth
    depth = _integer(body, "rerank_depth", 1, label)
    if depth > settings.max_candidates:
        raise bad_request(f"[{label}] is {depth}, above the maximum {settings.max_candidates}")
    return depth


def _field_names(
    body: Mapping[str, Any], key: str, label: str | None = None
) -> tuple[str, ...] | None:
    """A list of dotted field paths the reranker reads, or None when `key` is absent."""
    if key not in body:
        return None
    value = body[key]
    if not (
        isinstance(value, list)
        and 0 < len(value) <= MAX_DOCUMENT_FIELDS
        and all(
            isinstance(f, str)
            and 0 < len(f) <= MAX_FIELD_CHARS
            and f.strip() == f
            and "" not in f.split(".")
            for f in value
        )
    ):
        raise bad_request(
            f"[{label or key}] must be a non-empty list of at most {MAX_DOCUMENT_FIELDS} "
            "field names (dotted paths)"
        )
    return tuple(value)


def _string(
    body: Mapping[str, Any], key: str, max_chars: int, label: str | None = None
) -> str | None:
    label = label or key
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request(f"[{label}] must be a string")
    if not value.strip():
        raise bad_request(f"[{label}] must not be empty")
    if len(value) > max_chars:
        raise bad_request(f"[{label}] is longer than {max_chars} characters")
    if LONE_SURROGATE.search(value):
        raise bad_request(
            f"[{label}] contains an unpaired UTF-16 surrogate (not valid Unicode text)"
        )
    return value


def _integer(body: Mapping[str, Any], key: str, default: int, label: str | None = None) -> int:
    label = label or key
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"[{label}] must be an integer")
    if value < 1:
        raise bad_request(f"[{label}] must be at least 1")
    return value


def _boolean(body: Mapping[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise bad_request(f"[{key}] must be true or false")
    return value


def _weights(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        weights = [
            float(w) for w in value if isinstance(w, int | float) and not isinstance(w, bool)
        ]
    except (TypeError, OverflowError):
        weights = []
    if not (
        isinstance(value, list)
        and len(value) == len(weights) == 2
        and all(math.isfinite(w) and w >= 0 for w in weights)
        and 0 < sum(weights) < math.inf
    ):
        raise bad_request(
            "[weights] must be [lexical, vector]: two non-negative numbers, not both 0"
        )
    return weights[0], weights[1]
