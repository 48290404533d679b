"""A sample corpus that needs no download: the sections of Python's own reference documentation
(the `pydoc_data` topics bundled with every CPython), written as BEIR-format JSON lines."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from sidecar.indexing.corpus import Document

# Sections longer than this are split at paragraph boundaries, so documents stay passage-sized.
_MAX_SECTION_CHARS = 1500
# A reStructuredText-style heading: a line of text underlined with *, =, - or ~.
_HEADING = re.compile(r"^(?P<title>[^\n]+)\n(?P<rule>[*=\-~]{3,})$", re.MULTILINE)


def sample_documents() -> Iterator[Document]:
    """One document per distinct section (or section part) of the pydoc topics, in a stable order.

    Several topics share sections (`compound` and `try` both hold 'The "try" statement'): a text
    seen before is skipped, so that a search never returns the same passage twice."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    for topic in sorted(topics):
        for number, (title, text) in enumerate(_passages(topics[topic])):
            if text in seen:
                continue
            seen.add(text)
            yield Document(
                id=f"{topic}-{number}", title=title, text=text, metadata={"topic": topic}
            )


def write_sample_corpus(path: Path) -> int:
    """Write the sample corpus to `path`; returns the number of documents."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as out:
        for doc in sample_documents():
            out.write(
                json.dumps(
                    {"_id": doc.id, "title": doc.title, "text": doc.text, "metadata": doc.metadata}
                )
            )
            out.write("\n")
            count += 1
    return count


def _passages(topic_text: str) -> Iterator[tuple[str, str]]:
    headings = list(_HEADING.finditer(topic_text))
    if not headings:
        headings_and_bodies = [("", topic_text)]
    else:
        headings_and_bodies = [
            (match["title"].strip(), topic_text[match.end() : next_start])
            for match, next_start in zip(
                headings, [m.start() for m in headings[1:]] + [len(topic_text)], strict=True
            )
        ]
    for title, body in headings_and_bodies:
        chunk: list[str] = []
        for paragraph in (p.strip() for p in body.split("\n\n")):
            if not paragraph:
                continue
            if chunk and sum(map(len, chunk)) + len(paragraph) > _MAX_SECTION_CHARS:
                yield title, "\n\n".join(chunk)
                chunk = []
            chunk.append(paragraph)
        if chunk:
            yield title, "\n\n".join(chunk)
