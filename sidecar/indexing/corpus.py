"""Reading a BEIR-format corpus (`corpus.jsonl`: one JSON object per line with `_id`, `title`, `text`,
optional `metadata`) into documents, with line-numbered errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class CorpusError(ValueError):
    """A corpus line is not a valid document; the message names the file and line."""


@dataclass(frozen=True)
class Document:
    """A corpus entry. Title and text may both be empty (real collections have such entries, e.g.
    Cranfield 471): it is still indexed, so counts match the corpus."""

    id: str
    title: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def embedding_text(self) -> str:
        """What the bi-encoder sees: title and text, as BEIR's reference retrievers embed them."""
        return f"{self.title} {self.text}".strip()


@dataclass
class ReadReport:
    """Filled in while reading: how many lines were bad (only with skip_bad) and where."""

    skipped_lines: list[int] = field(default_factory=list)


def count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def read_corpus(
    path: Path, *, skip_bad: bool = False, report: ReadReport | None = None
) -> Iterator[Document]:
    """Yield documents in file order; blank lines are ignored.

    A malformed line raises CorpusError naming it, or with `skip_bad` is recorded in `report`.
    """
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield parse_document(line)
            except CorpusError as error:
                if not skip_bad:
                    raise CorpusError(f"{path}:{number}: {error}") from None
                if report is not None:
                    report.skipped_lines.append(number)


def parse_document(line: str) -> Document:
    """One corpus line to a Document; raises CorpusError saying what is wrong."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as error:
        raise CorpusError(f"not valid JSON ({error.msg})") from None
    if not isinstance(raw, dict):
        raise CorpusError("expected a JSON object")
    doc_id = raw.get("_id")
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise CorpusError("missing or empty '_id'")
    title = raw.get("title") or ""
    text = raw.get("text")
    if not isinstance(title, str):
        raise CorpusError("'title' must be a string")
    if not isinstance(text, str):
        raise CorpusError("missing 'text' or it is not a string")
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise CorpusError("'metadata' must be an object")
    return Document(id=doc_id, title=title, text=text, metadata=metadata)
