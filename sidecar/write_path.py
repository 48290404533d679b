"""The write path: documents written through the sidecar (`_doc`, `_create`, `_update`, `_bulk`) to an
index whose profile has `embed_on_write` get their vector here, before they are forwarded.

The only change to a write is the added vector member: it is inserted into the JSON text as sent,
so every other byte of the body goes upstream unchanged. A document that already carries the
vector, or has no text, is left as it is; lines this module cannot read are left for OpenSearch to
refuse, as it would without the sidecar. If embedding fails, `EmbeddingFailed` is raised and
nothing is forwarded: a write never reaches the cluster without its vector.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any

from sidecar import jsonio
from sidecar.embedding import EncoderPool
from sidecar.metrics import Metrics
from sidecar.retrieval.discovery import ProfileResolver
from sidecar.retrieval.profiles import IndexProfile, read_text

log = logging.getLogger(__name__)

# Fetches current `_source`s for partial updates: `_mget` docs in, `_mget` docs out, in order.
Fetch = Callable[[list[dict[str, Any]]], Awaitable[list[dict[str, Any]]]]

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_BULK_ACTIONS = frozenset({"index", "create", "update", "delete"})


class EmbeddingFailed(Exception):
    """The vectors of a write could not be computed; the write was not forwarded."""


@dataclass
class _Edit:
    """One JSON object of a write (a document, or the `doc`/`upsert` of an update) that needs
    its vector: where it sits in its line's text, and what the bi-encoder reads of it."""

    line: int
    # Member path from the line's top-level object to the target object: () or ("doc",).
    member: tuple[str, ...]
    profile: IndexProfile
    text: str
    vector: list[float] | None = None


@dataclass(frozen=True)
class _Item:
    """One write: an action of a bulk, or a single `_doc`/`_create`/`_update` request."""

    op: str
    index: str
    doc_id: str | None
    routing: str | None
    # The index's profile when it embeds on write, else None.
    profile: IndexProfile | None
    # Position of the item's body among the request's lines (None for a delete).
    line: int | None

    @property
    def key(self) -> tuple[str, str] | None:
        return None if self.doc_id is None else (self.index, self.doc_id)


class WritePath:
    def __init__(
        self,
        profiles: ProfileResolver,
        encoders: EncoderPool,
        executor: ThreadPoolExecutor,
        metrics: Metrics,
    ) -> None:
        self._profiles = profiles
        self._encoders = encoders
        self._executor = executor
        self._metrics = metrics

    async def target(
        self, index: str, caller: Mapping[str, str] | None = None
    ) -> IndexProfile | None:
        """The profile of a single-document write's index when its documents get vectors here,
        else None: the write then streams through unread. `caller`: the writer's identity
        headers, which the index's mapping is read with."""
        return await self._profiles.for_write(index, caller)

    async def document(
        self, profile: IndexProfile, index: str, body: bytes, caller: Mapping[str, str] | None
    ) -> bytes | None:
        """An `_doc`/`_create` body for `index` (its `target` profile) with its vector added, or
        None to forward it unchanged."""
        item = _Item("index", index, None, None, profile, 0)
        return await self._apply([body], [item], None, caller)

    async def update(
        self,
        profile: IndexProfile,
        index: str,
        doc_id: str,
        routing: str | None,
        body: bytes,
        fetch: Fetch,
        caller: Mapping[str, str] | None = None,
    ) -> bytes | None:
        """An `_update` body with the vector of its `doc` (merged with the stored document when
        the update changes only some text fields) and of its `upsert`, or None if unchanged."""
        item = _Item("update", index, doc_id, routing, profile, 0)
        return await self._apply([body], [item], fetch, caller)

    async def bulk(
        self,
        default_index: str | None,
        body: bytes,
        fetch: Fetch,
        caller: Mapping[str, str] | None = None,
    ) -> bytes | None:
        """A `_bulk` body with the vectors of its documents added, or None if unchanged.

        Lines are NDJSON: an action line, then (except for delete) its source line. Items are
        read in order, so an update sees what earlier items of the same bulk wrote."""
        lines = body.split(b"\n")
        items: list[_Item] = []
        profiles: dict[str, IndexProfile | None] = {}
        number = 0
        while number < len(lines):
            if not lines[number].strip():
                number += 1
                continue
            action = _action(lines[number])
            if action is None:
                return None  # OpenSearch refuses the whole request; nothing to add to it
            op, meta = action
            index, doc_id, routing = (
                meta.get("_index", default_index),
                meta.get("_id"),
                meta.get("routing"),
            )
            body_line = None if op == "delete" else number + 1
            number += 1 if op == "delete" else 2
            if not isinstance(index, str) or (body_line is not None and body_line >= len(lines)):
                continue  # OpenSearch refuses this item itself
            if index not in profiles:
                profiles[index] = await self._profiles.for_write(index, caller)
            items.append(
                _Item(
                    op,
                    index,
                    doc_id if isinstance(doc_id, str) else None,
                    routing if isinstance(routing, str) else None,
                    profiles[index],
                    body_line,
                )
            )
        if not any(item.profile is not None for item in items):
            return None
        return await self._apply(lines, items, fetch, caller)

    async def _apply(
        self,
        lines: list[bytes],
        items: Sequence[_Item],
        fetch: Fetch | None,
        caller: Mapping[str, str] | None,
    ) -> bytes | None:
        """`lines` joined again, with the vector added to every item that needs one."""
        sources = {item.line: _object(lines[item.line]) for item in items if item.line is not None}
        state = await self._stored(items, sources, fetch, caller)
        edits: list[_Edit] = []
        kept = 0
        for item in items:
            source = sources.get(item.line) if item.line is not None else None
            if item.op == "delete":
                if item.key is not None:
                    state[item.key] = None
                continue
            if source is None:
                continue  # not a JSON object: OpenSearch refuses this item itself
            if item.op in ("index", "create"):
                if item.key is not None:
                    state[item.key] = source
                if item.profile is not None and item.line is not None:
                    edit = _document_edit(item.line, (), source, item.profile)
                    edits += [edit] if edit is not None else []
                    kept += edit is None
                continue
            new_edits, untouched = _update_edits(item, source, state)
            edits += new_edits
            kept += untouched
        self._metrics.write_documents.labels("kept").inc(kept)
        if not edits:
            return None
        await self._embed(edits)
        texts = {number: lines[number].decode() for number in {e.line for e in edits}}
        for edit in edits:
            texts[edit.line] = _with_vector(
                texts[edit.line], edit.member, edit.profile, edit.vector
            )
        out = list(lines)
        for number, text in texts.items():
            out[number] = text.encode()
        return b"\n".join(out)

    async def _stored(
        self,
        items: Sequence[_Item],
        sources: Mapping[int, dict[str, Any] | None],
        fetch: Fetch | None,
        caller: Mapping[str, str] | None,
    ) -> dict[tuple[str, str], dict[str, Any] | None]:
        """The stored text fields of every document a partial update needs merged, unless an
        earlier item of the same request wrote or deleted it (None: no such document).

        An update through an alias over several indexes (a write alias after a rollover) lands
        in the alias's write index, and `_mget` refuses such an alias: it reads that index."""
        seen: set[tuple[str, str]] = set()
        wanted: list[_Item] = []
        for item in items:
            if item.key is None:
                continue
            source = sources.get(item.line) if item.line is not None else None
            doc = (source or {}).get("doc") if item.op == "update" else None
            if (
                item.profile is not None
                and item.key not in seen
                and isinstance(doc, dict)
                and _partial_text(doc, item.profile)
                and item.key not in {w.key for w in wanted}
            ):
                wanted.append(item)
            seen.add(item.key)
        if not wanted or fetch is None:
            return {}
        # Asked every time (the profile's cached mapping may predate a rollover).
        targets = {w.index: await self._profiles.write_index(w.index, caller) for w in wanted}
        docs = [
            {
                "_index": targets.get(w.index, w.index),
                "_id": w.doc_id,
                "_source": list(w.profile.text_fields),
            }
            | ({"routing": w.routing} if w.routing is not None else {})
            for w in wanted
            if w.profile is not None
        ]
        found = await fetch(docs)
        state: dict[tuple[str, str], dict[str, Any] | None] = {}
        for item, answer in zip(wanted, found, strict=True):
            source = answer.get("_source")
            if item.key is not None:
                state[item.key] = source if isinstance(source, dict) else None
        return state

    async def _embed(self, edits: Sequence[_Edit]) -> None:
        """Vectors for every edit, by bi-encoder, one batch at a time on the embedding executor
        (so query embeddings interleave with a large bulk)."""
        loop = asyncio.get_running_loop()
        by_model: dict[str | None, list[_Edit]] = {}
        for edit in edits:
            by_model.setdefault(edit.profile.model, []).append(edit)
        try:
            for model, group in by_model.items():
                encoder = self._encoders.get(model)
                step = max(1, encoder.batch_size)
                for start in range(0, len(group), step):
                    chunk = group[start : start + step]
                    vectors = await loop.run_in_executor(
                        self._executor, encoder.embed, [e.text for e in chunk]
                    )
                    for edit, vector in zip(chunk, vectors, strict=True):
                        edit.vector = vector
        except Exception as error:
            self._metrics.write_documents.labels("failed").inc(len(edits))
            log.exception("embedding on write failed")
            raise EmbeddingFailed("the documents' vectors could not be computed") from error
        self._metrics.write_documents.labels("embedded").inc(len(edits))


def _action(line: bytes) -> tuple[str, Mapping[str, Any]] | None:
    try:
        action = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not (isinstance(action, dict) and len(action) == 1):
        return None
    ((op, meta),) = action.items()
    if op not in _BULK_ACTIONS or not isinstance(meta, dict):
        return None
    return op, meta


def _object(line: bytes) -> dict[str, Any] | None:
    """A body line as a JSON object, or None when it is not one (OpenSearch refuses those)."""
    try:
        value = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _update_edits(
    item: _Item,
    source: Mapping[str, Any],
    state: dict[tuple[str, str], dict[str, Any] | None],
) -> tuple[list[_Edit], int]:
    """The edits of an update's `doc` (its text read from the document as the update leaves
    it) and `upsert` (a whole document of its own), and how many of the two need none. `state`
    is advanced to the document as this update leaves it."""
    doc, upsert = source.get("doc"), source.get("upsert")
    edits: list[_Edit] = []
    kept = 0
    if isinstance(doc, dict):
        merged = _merge((state.get(item.key) if item.key is not None else None) or {}, doc)
        if item.key is not None:
            state[item.key] = merged
        if item.profile is not None and item.line is not None:
            changes_text = any(_has_path(doc, f) for f in item.profile.text_fields)
            edit = (
                _document_edit(item.line, ("doc",), merged, item.profile)
                if changes_text and not _has_vector(doc, item.profile)
                else None
            )
            edits += [edit] if edit is not None else []
            kept += edit is None
    if isinstance(upsert, dict) and item.profile is not None and item.line is not None:
        edit = _document_edit(item.line, ("upsert",), upsert, item.profile)
        edits += [edit] if edit is not None else []
        kept += edit is None
    return edits, kept


def _partial_text(doc: Mapping[str, Any], profile: IndexProfile) -> bool:
    """Whether `doc` changes some of the text the vector is made of, but not all of it."""
    present = [_has_path(doc, f) for f in profile.text_fields]
    return any(present) and not all(present)


def _document_edit(
    line: int, member: tuple[str, ...], document: Mapping[str, Any], profile: IndexProfile
) -> _Edit | None:
    if _has_vector(document, profile):
        return None
    text = read_text(document, profile.text_fields)
    return _Edit(line, member, profile, text) if text else None


def _has_vector(document: Mapping[str, Any], profile: IndexProfile) -> bool:
    return profile.vector_field is not None and _has_path(document, profile.vector_field)


def _has_path(document: Mapping[str, Any], path: str) -> bool:
    """Whether `document` holds a value at dotted `path` (as nested objects or a dotted key)."""
    if path in document:
        return True
    head, _, rest = path.partition(".")
    inner = document.get(head)
    return bool(rest) and isinstance(inner, Mapping) and _has_path(inner, rest)


def _merge(current: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """`update` merged into `current`: objects recursively, anything else replaced."""
    merged = dict(current)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _with_vector(
    text: str, member: tuple[str, ...], profile: IndexProfile, vector: list[float] | None
) -> str:
    """`text` (one JSON object) with `"<vector field>": [...]` added as the last member of the
    object at `member`; every other character is kept."""
    if vector is None or profile.vector_field is None:
        raise ValueError("an edit without its vector")
    start = _WHITESPACE.match(text).end()  # type: ignore[union-attr]
    end = json.JSONDecoder().raw_decode(text, start)[1]
    for key in member:
        start, end = next((s, e) for k, s, e in _members(text, start) if k == key)
    close = end - 1
    inner_empty = not text[start + 1 : close].strip()
    added = f"{json.dumps(profile.vector_field)}:{jsonio.dumps(vector).decode()}"
    return text[:close] + ("" if inner_empty else ",") + added + text[close:]


def _members(text: str, start: int) -> Iterator[tuple[str, int, int]]:
    """(key, value start, value end) of each member of the valid JSON object at `text[start]`."""
    decoder = json.JSONDecoder()
    position = _skip(text, start + 1)
    while text[position] != "}":
        key, position = scanstring(text, position + 1)
        position = _skip(text, _skip(text, position) + 1)  # past the colon
        end = decoder.raw_decode(text, position)[1]
        yield key, position, end
        position = _skip(text, end)
        if text[position] == ",":
            position = _skip(text, position + 1)


def _skip(text: str, position: int) -> int:
    return _WHITESPACE.match(text, position).end()  # type: ignore[union-attr]
