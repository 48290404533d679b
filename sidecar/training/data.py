"""What a reranker is trained and validated on: the query split, hard negatives mined from the
sidecar's own first stage, training pairs, triples and lists, and weakly supervised pairs made
from the collection itself when judgments are few."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from sidecar.evaluation import Qrels, search
from sidecar.indexing.corpus import Document, read_corpus
from sidecar.indexing.templates import TEXT_FIELDS
from sidecar.rerank.final_scorer import Signals
from sidecar.retrieval.profiles import read_text

# A training pair: query text, document text, label (1.0 judged relevant, 0.0 negative).
Example = tuple[str, str, float]
# A distillation triple: query text, a judged-relevant document's text, a negative's text.
Triple = tuple[str, str, str]
# The trainer's dataset, column name to values: the loss's inputs in the order it reads them, then
# its target ("label", or "labels" per list for a listwise loss).
Columns = dict[str, list[Any]]
# Per validation query: its text, the relevant documents' texts, the first-stage candidates' texts.
ValidationQuery = tuple[str, list[str], list[str]]

NEGATIVES_FILE = "negatives.json"
SPLITS_FILE = "splits.json"


def split_queries(
    query_ids: Sequence[str], validation_share: float = 0.2, seed: int = 13
) -> tuple[list[str], list[str]]:
    """(train, validation) query ids, disjoint and reproducible: the ids are sorted before a seeded
    shuffle, so the split depends only on the set of ids and the seed, never on input order.

    With two or more ids both parts get at least one. Raises ValueError when the share is not in
    (0, 1).
    """
    if not 0.0 < validation_share < 1.0:
        raise ValueError(f"validation_share must be in (0, 1), got {validation_share}")
    ordered = sorted(set(query_ids))
    random.Random(seed).shuffle(ordered)
    count = round(len(ordered) * validation_share)
    if len(ordered) >= 2:
        count = min(max(count, 1), len(ordered) - 1)
    return sorted(ordered[count:]), sorted(ordered[:count])


def query_folds(query_ids: Sequence[str], count: int, seed: int = 13) -> list[list[str]]:
    """`count` folds of whole queries (fewer when there are fewer ids), reproducible as
    `split_queries` is: a seeded shuffle of the sorted ids, dealt round-robin."""
    ordered = sorted(set(query_ids))
    random.Random(seed).shuffle(ordered)
    return [ordered[start::count] for start in range(min(count, len(ordered)))]


# How a query's negatives are drawn from its non-relevant candidates: the first ones in rank order,
# or a seeded sample over the whole depth, so the model also sees the candidates it must keep
# below the relevant ones further down the list it will rerank.
NegativeSampling = Literal["top", "spread"]


def mine_negatives(
    candidates_by_query: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Mapping[str, int]],
    per_query: int,
    sampling: NegativeSampling = "top",
    seed: int = 13,
) -> dict[str, list[str]]:
    """Negatives per query, at most `per_query` of its first-stage candidates that are not judged
    relevant (relevance > 0), in rank order: the first ones (`top`), or a sample seeded by `seed`
    and the query id (`spread`).

    Documents judged 0 are kept: they are the hardest negatives there are. Unjudged candidates are
    assumed irrelevant (the usual, slightly noisy, assumption). Raises ValueError if
    `per_query` < 0.
    """
    if per_query < 0:
        raise ValueError(f"per_query must be >= 0, got {per_query}")
    negatives: dict[str, list[str]] = {}
    for query_id, candidates in candidates_by_query.items():
        judged = qrels.get(query_id, {})
        # dict.fromkeys: the first occurrence keeps the rank order.
        pool = [doc for doc in dict.fromkeys(candidates) if judged.get(doc, 0) <= 0]
        if sampling == "top" or len(pool) <= per_query:
            negatives[query_id] = pool[:per_query]
        else:
            drawn = random.Random(f"{seed}:{query_id}").sample(range(len(pool)), per_query)
            negatives[query_id] = [pool[i] for i in sorted(drawn)]
    return negatives


@dataclass(frozen=True)
class FirstStageHit:
    """One fused first-stage candidate as the native API reports it: the signals a learned final
    scorer reads, less the text's length (`signals`)."""

    fused_score: float
    lexical: tuple[int, float] | None
    vector: tuple[int, float] | None

    def signals(self, text: str) -> Signals:
        return Signals(self.fused_score, self.lexical, self.vector, len(text))


# Per query: its fused candidates, id to hit, best first.
Candidates = dict[str, dict[str, FirstStageHit]]


def first_stage_candidates(
    sidecar_url: str,
    index: str,
    queries: Mapping[str, str],
    candidates: int,
    progress: bool = True,
) -> Candidates:
    """The fused first-stage candidates per query, best first, from a running sidecar's native
    API with rerank off: the negatives are then the documents the reranker will actually have to
    demote, and the scores are what the final scorer mixes with the reranker's.

    Raises EvalError when the sidecar cannot be reached or refuses a request.
    """
    ranked: Candidates = {}
    for query_id, text in tqdm(
        queries.items(), desc="mining candidates", unit="query", disable=not progress
    ):
        body = {
            "index": index,
            "query": text,
            "k": candidates,
            "candidates": candidates,
            "rerank": False,
        }
        ranked[query_id] = {
            hit["id"]: FirstStageHit(
                hit["first_stage"]["score"],
                _source(hit["sources"]["lexical"]),
                _source(hit["sources"]["vector"]),
            )
            for hit in search(sidecar_url, body)["hits"]
        }
    return ranked


def _source(entry: Mapping[str, float] | None) -> tuple[int, float] | None:
    # A non-finite raw score comes back as null: the rank still counts, the score does not.
    return None if entry is None else (int(entry["rank"]), float(entry["score"] or 0.0))


# How a judged-relevant document is labelled: 1.0 whatever its grade, or its grade over the
# highest grade judged, so a loss on graded judgments learns the gains nDCG counts.
Labels = Literal["binary", "graded"]


def build_examples(
    queries: Mapping[str, str],
    documents: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    negatives: Mapping[str, Sequence[str]],
    labels: Labels = "binary",
) -> list[Example]:
    """Training pairs for the queries in `queries`, in their order: each judged-relevant document
    labelled as `labels` says (graded: its grade over the highest grade among these queries'
    judgments), then the query's negatives labelled 0.0.

    A query without a relevant document in `documents` contributes nothing, so every query trained
    on has both labels. Documents missing from `documents` (qrels naming ids absent from the
    corpus happen in real collections) are skipped. A negative that is judged relevant raises
    ValueError: it would teach the model the opposite of the judgments.
    """
    judged = list(_judged_texts(queries, documents, qrels, negatives))
    top = max((grade for _, relevant, _ in judged for _, grade in relevant), default=1)
    examples: list[Example] = []
    for query, relevant, negative in judged:
        examples.extend(
            (query, text, grade / top if labels == "graded" else 1.0) for text, grade in relevant
        )
        examples.extend((query, text, 0.0) for text in negative)
    return examples


def build_triples(
    queries: Mapping[str, str],
    documents: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    negatives: Mapping[str, Sequence[str]],
) -> list[Triple]:
    """Distillation triples for the queries in `queries`, in their order: every combination of a
    judged-relevant document with one of the query's negatives, so each relevant document gets
    all of them (as many as `negatives` holds per query).

    The teacher's margin on each triple is the target, so the negatives need no judgment of their
    own; the same skipping and refusal rules as `build_examples` apply.
    """
    return [
        (query, positive, negative)
        for query, relevant, negatives_of_query in _judged_texts(
            queries, documents, qrels, negatives
        )
        for positive, _ in relevant
        for negative in negatives_of_query
    ]


def _judged_texts(
    queries: Mapping[str, str],
    documents: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    negatives: Mapping[str, Sequence[str]],
) -> Iterator[tuple[str, list[tuple[str, int]], list[str]]]:
    """Per query with a relevant document in `documents`: its text, the relevant texts with their
    grades and the negatives' texts. Raises ValueError for a negative that is judged relevant."""
    for query_id, query in queries.items():
        judged = qrels.get(query_id, {})
        relevant = [
            (documents[doc], rel) for doc, rel in judged.items() if rel > 0 and doc in documents
        ]
        if not relevant:
            continue
        negative = []
        for doc in negatives.get(query_id, ()):
            if judged.get(doc, 0) > 0:
                raise ValueError(f"negative {doc!r} of query {query_id!r} is judged relevant")
            if doc in documents:
                negative.append(documents[doc])
        yield query, relevant, negative


def write_qrels(qrels: Qrels, path: Path) -> None:
    """BEIR qrels TSV with its header, as `read_qrels` and `sidecar eval --qrels` read it."""
    lines = ["query-id\tcorpus-id\tscore"]
    lines += [f"{q}\t{doc}\t{rel}" for q, docs in qrels.items() for doc, rel in docs.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_documents(corpus: Path, wanted: set[str]) -> dict[str, str]:
    """The texts of the `wanted` ids in a BEIR corpus, as the rerank stage builds them."""
    return {
        doc.id: read_text({"title": doc.title, "text": doc.text}, TEXT_FIELDS)
        for doc in read_corpus(corpus)
        if doc.id in wanted
    }


@dataclass(frozen=True)
class PseudoQuery:
    """A weakly supervised query made from one document: `query` is part of it, `positive` the
    rest, the one passage known to answer it."""

    doc_id: str
    query: str
    positive: str
    method: str  # "title", or "first_sentence" for a document without one


# A sentence ends at ., ! or ? followed by white space.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# A pseudo-query, or the passage left to answer it, shorter than this teaches nothing.
_MIN_WORDS = 3


def pseudo_queries(
    corpus: Path, count: int, seed: int
) -> tuple[list[PseudoQuery], dict[str, Document]]:
    """Up to `count` pseudo-queries from a BEIR corpus, from documents drawn by a seeded shuffle of
    the sorted ids (so the draw depends on the corpus and seed alone), and every document by id.

    A document's title is its query and its text the positive (title -> body, as in-domain
    pre-training for retrieval commonly uses); a document without a title gives its first
    sentence as the query and the rest of its text as the positive (the inverse cloze task: the
    sentence taken out of its context). A text that starts with its title loses it. Documents
    where either side has fewer than three words are skipped.
    """
    documents = {doc.id: doc for doc in read_corpus(corpus)}
    ordered = sorted(documents)
    random.Random(seed).shuffle(ordered)
    made: list[PseudoQuery] = []
    for doc_id in ordered:
        if len(made) == count:
            break
        document = documents[doc_id]
        title, text = document.title.strip(), document.text.strip()
        if title:
            query, positive, method = title, _body(document), "title"
        else:
            parts = _SENTENCE_END.split(text, maxsplit=1)
            query, positive = parts[0], parts[1] if len(parts) == 2 else ""
            method = "first_sentence"
        if len(query.split()) >= _MIN_WORDS and len(positive.split()) >= _MIN_WORDS:
            made.append(PseudoQuery(doc_id, query, positive, method))
    return made, documents


def pseudo_examples(
    pseudo: Sequence[PseudoQuery],
    candidates: Mapping[str, Sequence[str]],
    documents: Mapping[str, Document],
    negatives: int,
) -> list[Example]:
    """Training pairs from pseudo-queries: each positive labelled 1.0, then the top `negatives`
    of the query's first-stage candidates (keyed by the source document's id) other than its
    source labelled 0.0. Negatives are read as the positive was, without their title when the
    query is a title, so the title's absence cannot give the positive away."""
    examples: list[Example] = []
    for entry in pseudo:
        examples.append((entry.query, entry.positive, 1.0))
        others = [doc for doc in candidates.get(entry.doc_id, ()) if doc != entry.doc_id]
        for doc_id in others[:negatives]:
            document = documents[doc_id]
            text = _body(document) if entry.method == "title" else document.embedding_text
            if text.strip():
                examples.append((entry.query, text.strip(), 0.0))
    return examples


def _body(document: Document) -> str:
    """The text without the title, which some collections (Cranfield) repeat at its start."""
    title, text = document.title.strip(), document.text.strip()
    return text[len(title) :].strip() if title and text.startswith(title) else text
