"""Index profiles: per index, what the first stage queries and what the reranker and the write path
read. The first stage and the query builders take one `IndexProfile`, never field-name constants.

A profile is resolved per index expression from three places, in order: a `[profiles."<name or
pattern>"]` table of the config file, the index's own mapping (discovery), and the defaults (the
published BM25 protocol: best_fields over the text fields, tie_breaker 0.5, no boosts). Each part
of a resolved profile records where it came from.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sidecar.config import Embedding, MatchType, ProfileConfig, VectorConfig

Origin = Literal["config", "discovered", "default"]

# Fields every index has: filters may use them whatever the mapping says.
_METADATA_FIELDS = frozenset({"_id", "_index", "_routing"})
_TEXT_TYPES = frozenset({"text", "match_only_text"})
_NOT_FILTERABLE_TYPES = frozenset({"knn_vector", "semantic", "rank_features", "sparse_vector"})
# Field names listed in an error message at most.
_MAX_LISTED = 30


class ProfileError(ValueError):
    """A profile cannot work for an index; the message names the index, the fields and the fix."""


def match_profile(
    configs: Mapping[str, ProfileConfig], index: str
) -> tuple[str, ProfileConfig] | None:
    """The profile for an index expression: an exact name wins, else the first matching pattern."""
    if index in configs:
        return index, configs[index]
    for pattern, config in configs.items():
        if fnmatch.fnmatchcase(index, pattern):
            return pattern, config
    return None


@dataclass(frozen=True)
class VectorField:
    path: str
    type: Literal["knn_vector", "semantic"]
    dimension: int | None
    model_id: str | None = None


@dataclass(frozen=True)
class VectorDisagreement:
    """A vector field that the indexes behind one name (an alias, a pattern, a data stream) do not
    all map alike: a k-NN query on it would fail on some of them, so it is not used."""

    path: str
    # (concrete index, how it maps the field or "not mapped"), in the mapping answer's order.
    mapped_as: tuple[tuple[str, str], ...]

    def describe(self) -> str:
        return f"{self.path!r} (" + "; ".join(f"{i}: {how}" for i, how in self.mapped_as) + ")"


@dataclass(frozen=True)
class MappingInfo:
    """What the first stage needs to know of an index expression's mapping: every concrete index
    behind it (an alias, a pattern, a comma list or a data stream's backing indexes) merged."""

    indexes: tuple[str, ...]
    text_fields: tuple[str, ...]
    vector_fields: tuple[VectorField, ...]
    # Paths a filter may name: indexed leaf fields (multi-fields included) and object paths.
    filterable_fields: frozenset[str]
    # `_meta.sidecar` of indexes made by `sidecar index create`.
    sidecar_meta: Mapping[str, Any] = field(default_factory=dict)
    # Vector fields left out because the indexes disagree on them.
    disagreements: tuple[VectorDisagreement, ...] = ()

    @classmethod
    def from_response(cls, response: Mapping[str, Any]) -> MappingInfo:
        """From `GET <expression>/_mapping` (one entry per concrete index): text fields in
        mapping order, the union over the indexes; a vector field counts only when every index
        maps it alike (type, dimension, model), else it is recorded as a disagreement."""
        text: dict[str, None] = {}
        per_index: dict[str, dict[str, VectorField]] = {}
        filterable: set[str] = set(_METADATA_FIELDS)
        meta: dict[str, Any] = {}
        for index, body in response.items():
            mappings = body.get("mappings", {})
            meta = meta or dict(mappings.get("_meta", {}).get("sidecar", {}))
            found = per_index.setdefault(index, {})
            for path, spec, nested in _walk(mappings.get("properties", {})):
                kind = spec.get("type", "object")
                if kind in _TEXT_TYPES and not nested:
                    text.setdefault(path)
                if kind == "knn_vector":
                    found[path] = VectorField(path, "knn_vector", spec.get("dimension"))
                elif kind == "semantic":
                    found[path] = VectorField(path, "semantic", None, spec.get("model_id"))
                if kind not in _NOT_FILTERABLE_TYPES and spec.get("index", True) is not False:
                    filterable.add(path)
                    filterable.update(f"{path}.{sub}" for sub in spec.get("fields", {}))
        agreed: list[VectorField] = []
        disagreements: list[VectorDisagreement] = []
        paths = dict.fromkeys(path for found in per_index.values() for path in found)
        for path in paths:  # in mapping order
            seen = {index: found.get(path) for index, found in per_index.items()}
            first = next(iter(seen.values()))
            if first is not None and all(v == first for v in seen.values()):
                agreed.append(first)
            else:
                disagreements.append(
                    VectorDisagreement(
                        path,
                        tuple((index, _vector_kind(v)) for index, v in seen.items()),
                    )
                )
        return cls(
            indexes=tuple(response),
            text_fields=tuple(text),
            vector_fields=tuple(agreed),
            filterable_fields=frozenset(filterable),
            sidecar_meta=meta,
            disagreements=tuple(disagreements),
        )


def _walk(
    properties: Mapping[str, Any], prefix: str = "", nested: bool = False
) -> Iterator[tuple[str, Mapping[str, Any], bool]]:
    """(dotted path, field spec, inside a nested object) for every mapped field, depth first.
    Objects with `enabled: false` are opaque: nothing under them is searchable."""
    for name, spec in properties.items():
        path = f"{prefix}{name}"
        yield path, spec, nested
        if "properties" in spec and spec.get("enabled", True) is not False:
            inner = nested or spec.get("type") == "nested"
            yield from _walk(spec["properties"], f"{path}.", inner)


@dataclass(frozen=True)
class IndexProfile:
    """The resolved profile the first stage, the reranker and the write path use for one index."""

    name: str
    lexical_fields: tuple[str, ...]
    lexical_type: MatchType
    tie_breaker: float | None
    vector_field: str | None
    embedding: Embedding
    # local: the bi-encoder's name; neural: the cluster's model id (None: the field's default).
    model: str | None
    # Of the vector field as mapped (None where unknown, e.g. a semantic field).
    dimension: int | None
    text_fields: tuple[str, ...]
    document_fields: tuple[str, ...]
    max_chars_per_field: int | None
    source_excludes: tuple[str, ...]
    default_filter: Mapping[str, Any] | None
    embed_on_write: bool
    # None when the index's mapping is not known (a configured pattern not yet used).
    filterable_fields: frozenset[str] | None
    # Part of the profile -> config, discovered or default.
    origins: Mapping[str, Origin]
    # Why the first stage is lexical-only, when it is.
    lexical_only_reason: str | None = None
    # The concrete indexes the name resolved to when the mapping was read (empty: not known).
    indexes: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        """The effective profile as `GET /v1/indexes/{index}/profile` shows it."""
        return {
            "profile": self.name,
            "indexes": list(self.indexes),
            "lexical": {
                "fields": list(self.lexical_fields),
                "type": self.lexical_type,
                "tie_breaker": self.tie_breaker,
            },
            "vector": {
                "field": self.vector_field,
                "embedding": self.embedding,
                "model": self.model,
                "dimension": self.dimension,
                "text_fields": list(self.text_fields),
                "lexical_only_reason": self.lexical_only_reason,
            },
            "rerank": {
                "document_fields": list(self.document_fields),
                "max_chars_per_field": self.max_chars_per_field,
            },
            "source_excludes": list(self.source_excludes),
            "default_filter": self.default_filter,
            "embed_on_write": self.embed_on_write,
            "filterable_fields": (
                None if self.filterable_fields is None else sorted(self.filterable_fields)
            ),
            "origins": dict(self.origins),
        }


def build_profile(
    index: str,
    configured: tuple[str, ProfileConfig] | None,
    mapping: MappingInfo | None,
    *,
    local_model: str,
    local_dimensions: Mapping[str, int],
    allow_lexical_only: bool,
) -> IndexProfile:
    """Resolve the profile of `index` from its config table, its mapping and the defaults.

    `local_dimensions` has the dimension of every loaded bi-encoder by name; `local_model` is the
    default one. Raises ProfileError when no vector field can be used (unless lexical-only is
    allowed) or a configured field disagrees with the mapping."""
    name, config = configured if configured is not None else (f"discovered:{index}", None)
    cfg = config or ProfileConfig()
    origins: dict[str, Origin] = {}

    def pick(part: str, from_config: Any, discovered: Any, default: Any) -> Any:
        if from_config is not None:
            origins[part] = "config"
            return from_config
        if discovered is not None:
            origins[part] = "discovered"
            return discovered
        origins[part] = "default"
        return default

    if mapping is not None and not mapping.indexes:
        raise ProfileError(
            f"{index!r} matches no index (or none this caller may read); name an existing index, "
            "alias, data stream or pattern"
        )
    text_fields = mapping.text_fields if mapping and mapping.text_fields else None
    lexical_fields = pick("lexical.fields", cfg.lexical.fields, text_fields, None)
    if lexical_fields is None:
        raise ProfileError(
            f"index {index!r} has no analyzed text field for the lexical query; "
            'name them in its profile ([profiles."..."] lexical.fields)'
        )
    origins["lexical.type"] = origins["lexical.tie_breaker"] = (
        "config" if configured is not None else "default"
    )
    vector = _resolve_vector(index, cfg.vector, mapping, local_model, local_dimensions)
    lexical_only_reason = None
    if vector is None:
        embedding: Embedding = "none"
        vector_field, model, dimension = None, None, None
        origins["vector"] = "config" if cfg.vector.embedding == "none" else "discovered"
        if cfg.vector.embedding != "none":
            lexical_only_reason = _no_vector_reason(index, mapping, local_dimensions[local_model])
            if not allow_lexical_only:
                raise ProfileError(
                    f"{lexical_only_reason}; configure a profile with vector.field, or set "
                    "SIDECAR_ALLOW_LEXICAL_ONLY=true for a lexical-only first stage"
                )
        else:
            lexical_only_reason = "the profile sets vector.embedding = none"
    else:
        embedding, vector_field, model, dimension = vector
        origins["vector"] = (
            "config" if cfg.vector.field is not None or cfg.vector.embedding else "discovered"
        )
    meta = mapping.sidecar_meta if mapping else {}
    document_fields = pick(
        "rerank.document_fields",
        cfg.rerank.document_fields,
        _tuple(meta.get("text_fields")) or text_fields,
        ("title", "text"),
    )
    embed_text_fields = pick(
        "vector.text_fields",
        cfg.vector.text_fields,
        _tuple(meta.get("text_fields")),
        document_fields,
    )
    excludes = pick(
        "source_excludes",
        cfg.source_excludes,
        None,
        (vector_field,) if vector_field else (),
    )
    embed_on_write = pick(
        "embed_on_write",
        cfg.embed_on_write,
        meta.get("embed_on_write") if isinstance(meta.get("embed_on_write"), bool) else None,
        False,
    )
    origins["default_filter"] = "config" if cfg.default_filter is not None else "default"
    return IndexProfile(
        name=name,
        lexical_fields=tuple(lexical_fields),
        lexical_type=cfg.lexical.type,
        tie_breaker=cfg.lexical.tie_breaker,
        vector_field=vector_field,
        embedding=embedding,
        model=model,
        dimension=dimension,
        text_fields=tuple(embed_text_fields),
        document_fields=tuple(document_fields),
        max_chars_per_field=cfg.rerank.max_chars_per_field,
        source_excludes=tuple(excludes),
        default_filter=cfg.default_filter,
        embed_on_write=embed_on_write and embedding == "local",
        filterable_fields=mapping.filterable_fields if mapping else None,
        origins=origins,
        lexical_only_reason=lexical_only_reason,
        indexes=mapping.indexes if mapping else (),
    )


def discover_profile(
    index: str, mapping: Mapping[str, Any], model: str, dimension: int
) -> IndexProfile:
    """The profile the sidecar discovers for `index` from its `_mapping` response alone, with one
    local bi-encoder (for commands and tests that query OpenSearch as the sidecar would)."""
    return build_profile(
        index,
        None,
        MappingInfo.from_response(mapping),
        local_model=model,
        local_dimensions={model: dimension},
        allow_lexical_only=False,
    )


def _resolve_vector(
    index: str,
    cfg: VectorConfig,
    mapping: MappingInfo | None,
    local_model: str,
    local_dimensions: Mapping[str, int],
) -> tuple[Embedding, str, str | None, int | None] | None:
    """(embedding, field, model, dimension) or None for a lexical-only first stage."""
    if cfg.embedding == "none":
        return None
    mapped = {v.path: v for v in mapping.vector_fields} if mapping else {}
    model = cfg.model or local_model
    if cfg.field is not None:
        found = mapped.get(cfg.field)
        if mapping is not None and found is None:
            raise ProfileError(
                f"profile for {index!r} names vector.field {cfg.field!r}, which {index!r} does "
                f"not map as a knn_vector or semantic field (found: {_vector_list(mapping)})"
                + _disagreement_note(index, mapping)
            )
        embedding = cfg.embedding or ("neural" if found and found.type == "semantic" else "local")
        dimension = found.dimension if found else None
        if embedding == "local":
            expected = local_dimensions[model]
            if dimension is not None and dimension != expected:
                raise ProfileError(
                    f"index {index!r} maps {cfg.field!r} with dimension {dimension}, but the "
                    f"profile's bi-encoder {model!r} produces {expected}"
                )
            return "local", cfg.field, model, dimension
        return "neural", cfg.field, cfg.model_id or (found.model_id if found else None), dimension
    if mapping is None:
        return None
    if cfg.embedding != "neural":
        expected = local_dimensions[model]
        matching = [
            v for v in mapping.vector_fields if v.type == "knn_vector" and v.dimension == expected
        ]
        if len(matching) > 1:
            raise ProfileError(
                f"index {index!r} has several knn_vector fields of dimension {expected} "
                f"({', '.join(v.path for v in matching)}); name one in its profile (vector.field)"
            )
        if matching:
            return "local", matching[0].path, model, expected
    semantic = [v for v in mapping.vector_fields if v.type == "semantic"]
    if cfg.embedding == "neural":
        semantic = semantic or [v for v in mapping.vector_fields if v.type == "knn_vector"]
    if len(semantic) == 1:
        chosen = semantic[0]
        return "neural", chosen.path, cfg.model_id or chosen.model_id, chosen.dimension
    return None


def _no_vector_reason(index: str, mapping: MappingInfo | None, dimension: int) -> str:
    found = _vector_list(mapping) if mapping else "mapping unknown"
    return (
        f"index {index!r} has no knn_vector field of dimension {dimension} (the bi-encoder's) "
        f"and no single semantic field (found: {found})" + _disagreement_note(index, mapping)
    )


def _disagreement_note(index: str, mapping: MappingInfo | None) -> str:
    """What to tell about the indexes behind `index` that map a vector field differently."""
    if mapping is None or not mapping.disagreements:
        return ""
    fields = ", ".join(d.describe() for d in mapping.disagreements)
    return (
        f"; the indexes behind {index!r} do not map these vector fields alike: {fields}: map "
        "the field alike in every index (e.g. reindex the odd ones from the same template) or "
        "search only the indexes that agree"
    )


def _vector_kind(vector: VectorField | None) -> str:
    if vector is None:
        return "not mapped"
    if vector.dimension is not None:
        return f"{vector.type}, dimension {vector.dimension}"
    if vector.model_id is not None:
        return f"{vector.type}, model {vector.model_id}"
    return vector.type


def _vector_list(mapping: MappingInfo) -> str:
    if not mapping.vector_fields:
        return "none mapped alike in every index" if mapping.disagreements else "no vector fields"
    return ", ".join(f"{v.path} ({_vector_kind(v)})" for v in mapping.vector_fields)


def _tuple(value: Any) -> tuple[str, ...] | None:
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


# Valid in a JSON string, in no UTF-8 text: the tokenizers fail on it.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def read_text(
    source: Mapping[str, Any], paths: Sequence[str], max_chars_per_field: int | None = None
) -> str:
    """What a model reads of a document: the values at `paths` (dotted; objects followed, arrays
    joined), each cut to `max_chars_per_field`, joined by spaces in the order given. An unpaired
    UTF-16 surrogate (JSON allows one; no tokenizer does) becomes U+FFFD."""
    parts = []
    for path in paths:
        text = LONE_SURROGATE.sub("\ufffd", " ".join(_values(source, path.split("."))))
        if max_chars_per_field is not None:
            text = text[:max_chars_per_field]
        if text.strip():
            parts.append(text.strip())
    return " ".join(parts)


def _values(value: Any, keys: Sequence[str]) -> Iterator[str]:
    if isinstance(value, list):
        for item in value:
            yield from _values(item, keys)
        return
    if not keys:
        if isinstance(value, str):
            yield value
        elif (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        ):
            yield json.dumps(value)
        return
    if not isinstance(value, Mapping):
        return
    # A key may itself hold dots ({"content.en": ...}), as OpenSearch accepts in _source.
    for split in range(len(keys), 0, -1):
        joined = ".".join(keys[:split])
        if joined in value:
            yield from _values(value[joined], keys[split:])
            return


def filter_fields(clause: Any) -> Iterator[str]:
    """The field names a query clause refers to, for the query types whose shape names them;
    wildcard names and clauses of other types are not reported."""
    if isinstance(clause, list):
        for item in clause:
            yield from filter_fields(item)
        return
    if not isinstance(clause, Mapping):
        return
    for kind, body in clause.items():
        if not isinstance(body, Mapping):
            continue
        if kind == "bool":
            for occur in ("must", "filter", "should", "must_not"):
                yield from filter_fields(body.get(occur))
        elif kind in ("constant_score",):
            yield from filter_fields(body.get("filter"))
        elif kind in ("nested", "has_child", "has_parent"):
            yield from filter_fields(body.get("query"))
        elif kind == "dis_max":
            yield from filter_fields(body.get("queries"))
        elif kind == "boosting":
            yield from filter_fields([body.get("positive"), body.get("negative")])
        elif kind == "exists" and isinstance(body.get("field"), str):
            yield body["field"]
        elif kind in _FIELD_KEYED_QUERIES:
            for name in body:
                if name not in ("boost", "_name") and "*" not in name:
                    yield name


_FIELD_KEYED_QUERIES = frozenset(
    {
        "term",
        "terms",
        "terms_set",
        "range",
        "prefix",
        "wildcard",
        "regexp",
        "fuzzy",
        "match",
        "match_phrase",
        "match_phrase_prefix",
        "match_bool_prefix",
    }
)


def check_filter(profile: IndexProfile, index: str, clause: Mapping[str, Any]) -> None:
    """Raise ProfileError naming the first field `clause` uses that `index` does not index (a
    filter on it would match nothing, silently)."""
    if profile.filterable_fields is None:
        return
    for name in filter_fields(clause):
        if name not in profile.filterable_fields:
            known = sorted(profile.filterable_fields - _METADATA_FIELDS)
            shown = ", ".join(known[:_MAX_LISTED]) + (", ..." if len(known) > _MAX_LISTED else "")
            raise ProfileError(
                f"[filter] uses field {name!r}, which index {index!r} does not map as a "
                f"searchable field; filterable fields: {shown or 'none'}"
            )
