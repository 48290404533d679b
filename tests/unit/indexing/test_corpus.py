import json
from pathlib import Path

import pytest

from sidecar.indexing.corpus import CorpusError, Document, ReadReport, parse_document, read_corpus


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_parses_beir_documents() -> None:
    doc = parse_document(json.dumps({"_id": 7, "title": "T", "text": "body", "metadata": {"a": 1}}))
    assert doc == Document(id="7", title="T", text="body", metadata={"a": 1})
    assert doc.embedding_text == "T body"


def test_title_is_optional() -> None:
    assert parse_document('{"_id": "x", "text": "only text"}').embedding_text == "only text"


def test_empty_documents_are_kept() -> None:
    assert parse_document('{"_id": "471", "title": "", "text": ""}').embedding_text == ""


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"text": "t"}', "missing or empty '_id'"),
        ('{"_id": "", "text": "t"}', "missing or empty '_id'"),
        ('{"_id": "a"}', "missing 'text'"),
        ('{"_id": "a", "text": 5}', "missing 'text'"),
        ('{"_id": "a", "title": ["x"], "text": "t"}', "'title' must be a string"),
        ('{"_id": "a", "text": "t", "metadata": [1]}', "'metadata' must be an object"),
    ],
)
def test_malformed_lines_are_rejected(line: str, message: str) -> None:
    with pytest.raises(CorpusError, match=message):
        parse_document(line)


def test_error_names_file_and_line(tmp_path: Path) -> None:
    corpus = write_lines(tmp_path / "c.jsonl", ['{"_id": "1", "text": "a"}', "", "oops"])
    with pytest.raises(CorpusError, match=r"c\.jsonl:3: not valid JSON"):
        list(read_corpus(corpus))


def test_skip_bad_counts_every_bad_line(tmp_path: Path) -> None:
    corpus = write_lines(
        tmp_path / "c.jsonl",
        ["oops", '{"_id": "1", "text": "a"}', '{"_id": 2}', '{"_id": "3", "text": "c"}'],
    )
    report = ReadReport()
    docs = list(read_corpus(corpus, skip_bad=True, report=report))
    assert [d.id for d in docs] == ["1", "3"]
    assert report.skipped_lines == [1, 3]
