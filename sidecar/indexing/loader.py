"""Loading a BEIR corpus into a hybrid index: embed title + text in batches, bulk-index, verify the count."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opensearchpy import OpenSearch, helpers
from tqdm import tqdm

from sidecar.embedding import BiEncoder
from sidecar.indexing.corpus import Document, ReadReport, count_lines, read_corpus
from sidecar.indexing.templates import VECTOR_FIELD

# Documents embedded per step; a bulk request carries the same number.
_BATCH_DOCS = 256
# 429 (too many requests) is retried by opensearch-py's bulk helper with exponential backoff.
_MAX_RETRIES = 8
_INITIAL_BACKOFF_S = 1
_MAX_BACKOFF_S = 30


class LoadError(RuntimeError):
    """Documents were rejected or the final count disagrees; the message says how many and why."""


@dataclass(frozen=True)
class LoadReport:
    documents_read: int
    distinct_ids: int
    index_count: int
    skipped_lines: tuple[int, ...]


def load_corpus(
    client: OpenSearch,
    encoder: BiEncoder,
    index: str,
    corpus: Path,
    *,
    skip_bad: bool = False,
    show_progress: bool = True,
) -> LoadReport:
    """Index every document of `corpus` (ids are kept, so loading twice is idempotent).

    Raises CorpusError on a malformed line (unless skip_bad), LoadError if a document is rejected
    or the index ends with a count different from the number of distinct ids read.
    """
    read = ReadReport()
    ids: set[str] = set()
    documents_read = 0
    failures: list[str] = []
    with tqdm(
        total=count_lines(corpus), unit="doc", desc=f"load {index}", disable=not show_progress
    ) as bar:
        batches = _batched(read_corpus(corpus, skip_bad=skip_bad, report=read), _BATCH_DOCS)

        def actions() -> Iterator[dict[str, Any]]:
            nonlocal documents_read
            for batch in batches:
                vectors = encoder.embed([doc.embedding_text for doc in batch])
                for doc, vector in zip(batch, vectors, strict=True):
                    ids.add(doc.id)
                    yield _bulk_action(index, doc, vector)
                documents_read += len(batch)
                bar.update(len(batch))

        for ok, item in helpers.streaming_bulk(
            client,
            actions(),
            chunk_size=_BATCH_DOCS,
            max_retries=_MAX_RETRIES,
            initial_backoff=_INITIAL_BACKOFF_S,
            max_backoff=_MAX_BACKOFF_S,
            raise_on_error=False,
            raise_on_exception=True,
        ):
            if not ok:
                failures.append(str(item))
        bar.update(len(read.skipped_lines))
    if failures:
        raise LoadError(f"{len(failures)} documents were rejected; first: {failures[0][:500]}")
    client.indices.refresh(index=index)
    count = int(client.count(index=index)["count"])
    if count != len(ids):
        raise LoadError(
            f"index {index!r} holds {count} documents but {len(ids)} distinct ids were read from "
            f"{corpus} (another writer, or documents outside this corpus?)"
        )
    return LoadReport(
        documents_read=documents_read,
        distinct_ids=len(ids),
        index_count=count,
        skipped_lines=tuple(read.skipped_lines),
    )


def _bulk_action(index: str, doc: Document, vector: list[float]) -> dict[str, Any]:
    return {
        "_op_type": "index",
        "_index": index,
        "_id": doc.id,
        "_source": {
            "title": doc.title,
            "text": doc.text,
            "metadata": doc.metadata,
            VECTOR_FIELD: vector,
        },
    }


def _batched(documents: Iterator[Document], size: int) -> Iterator[list[Document]]:
    while batch := list(itertools.islice(documents, size)):
        yield batch
