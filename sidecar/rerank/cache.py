"""The rerank score cache: repeated (query, document) pairs skip inference.

Keys carry the model's identity and truncation settings, so a new model, revision or max length
never reads old scores; the query exactly as sent; the document as (index, id), so two indexes
sharing an id never share an entry; and a hash of the document's text, so an updated document is
scored again. Touched only from the event loop thread (the reranker's owner), so it needs no lock.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence

from cachetools import TTLCache

from sidecar.documents import DocKey

# (model identity and truncation settings, query, index, id, text hash)
CacheKey = tuple[str, str, str, str, str]


def content_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


class ScoreCache:
    """LRU + TTL, bounded by entry count (one entry: a key of five short strings and a float)."""

    def __init__(
        self, max_entries: int, ttl_s: float, timer: Callable[[], float] = time.monotonic
    ) -> None:
        self._scores: TTLCache[CacheKey, float] = TTLCache(
            maxsize=max_entries, ttl=ttl_s, timer=timer
        )

    @staticmethod
    def key(namespace: str, query: str, document: DocKey, text: str) -> CacheKey:
        """The query is kept exactly as sent: case, Unicode form and whitespace each change the
        tokens of some model (a cased XLM-R reranker, a byte-level BPE one), so any folding here
        could hand one query another's score."""
        return (
            namespace,
            query,
            document.index,
            document.id,
            content_hash(text),
        )

    def get_many(self, keys: Sequence[CacheKey]) -> list[float | None]:
        return [self._scores.get(key) for key in keys]

    def put_many(self, keys: Sequence[CacheKey], scores: Sequence[float]) -> None:
        for key, score in zip(keys, scores, strict=True):
            self._scores[key] = score

    def __len__(self) -> int:
        return len(self._scores)
