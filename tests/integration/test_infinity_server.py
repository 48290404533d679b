"""Infinity (infinity_server.py) serving a cross-encoder on 127.0.0.1: its Cohere-style /rerank
scores equal the in-process torch runtime's logits on the same pairs (raw, or through a sigmoid),
mapped back by index, long documents cut at the same length; too many documents are refused."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.rerank.backend import CrossEncoderBackend
from tests.integration.infinity_server import InfinityServer, infinity_venv, running_infinity
from tests.integration.model_servers import MAX_LENGTH, call_json, install_uncaptured

pytestmark = pytest.mark.integration

# Same weights, same torch, fp32 on both sides, only the batches differ: at most float rounding
# (observed: logits within 1.5e-7, sigmoids within 7.4e-8; the logits span -1.5 to 2.3 and lie
# at least 3.9e-4 apart).
TOLERANCE = 1e-5
MAX_CLIENT_BATCH_SIZE = 24
LONG_DOCUMENT = " ".join(
    f"Generator step {i} yields the next value of the sequence." for i in range(60)
)
DOCUMENTS = {
    "how do python generators work": (
        "A generator function returns an iterator that yields its values one at a time.",
        "The capital of France is Paris.",
        "yield suspends the function and resumes it when next() is called.",
        "  Bananas are yellow when ripe.  ",
        "A list comprehension builds the whole list in memory at once.",
        LONG_DOCUMENT,
        "asyncio's event loop runs coroutines, which are built on generators.",
        "Knead the dough, let it proof overnight, then bake it in a hot oven.",
        "(x * x for x in range(10)) is a generator expression.",
        "Glaciers carve fjords; their meltwater leaves moraines behind.",
    ),
    "offside rule in football": (
        "A player is offside when nearer the goal line than the ball and the second-last defender.",
        "Python generators are lazy iterators.",
        "The referee awards a penalty for a foul in the box.",
        "Magma rises through a vent and erupts as lava and ash.",
        "Offside is not judged from a throw-in, a goal kick or a corner.",
        "A vaccine shows the immune system an antigen.",
        "The keeper may handle the ball only inside the penalty area.",
        LONG_DOCUMENT,
        "The league table ranks clubs by points.",
        "Sourdough bread rises with wild yeast.",
    ),
}


@pytest.fixture(scope="module")
def server(sequence_classifier: Path, pytestconfig: pytest.Config) -> Iterator[InfinityServer]:
    install_uncaptured(pytestconfig, infinity_venv)
    with running_infinity(
        sequence_classifier, max_client_batch_size=MAX_CLIENT_BATCH_SIZE
    ) as running:
        yield running


@pytest.fixture(scope="module")
def logits(sequence_classifier: Path) -> dict[str, list[float]]:
    """The in-process runtime's raw logits, per query in DOCUMENTS' order."""
    backend = CrossEncoderBackend(
        str(sequence_classifier), device="cpu", dtype="float32", runtime="torch"
    )
    assert backend.max_length == MAX_LENGTH
    scores = {}
    for query, documents in DOCUMENTS.items():
        pairs = backend.prepare(query, documents, "first", 0)
        assert max(pair.token_length for [pair] in pairs) == MAX_LENGTH  # the long one is cut
        scores[query] = backend.score([pair for [pair] in pairs])
    every = [score for query_scores in scores.values() for score in query_scores]
    assert max(every) - min(every) > 1.0, "scores too flat for the comparison to mean anything"
    return scores


def rerank(server: InfinityServer, body: dict[str, Any]) -> tuple[int, Any]:
    """POST /rerank; the status and the decoded answer, errors included."""
    return call_json(f"{server.url}/rerank", {"model": server.model, **body})


def by_index(results: list[dict[str, Any]], count: int) -> list[float]:
    """The scores in the order the documents were sent, each result placed by its index."""
    assert sorted(result["index"] for result in results) == list(range(count))
    scores = [math.nan] * count
    for result in results:
        scores[result["index"]] = result["relevance_score"]
    return scores


def test_the_server_answers_to_the_last_two_parts_of_the_model_path(
    server: InfinityServer, sequence_classifier: Path
) -> None:
    assert server.model == f"{sequence_classifier.parent.name}/{sequence_classifier.name}"


def test_raw_scores_are_the_in_process_logits_mapped_back_by_index(
    server: InfinityServer, logits: dict[str, list[float]]
) -> None:
    for query, documents in DOCUMENTS.items():
        status, answer = rerank(
            server,
            {
                "query": query,
                "documents": list(documents),
                "raw_scores": True,
                "return_documents": True,
            },
        )

        assert status == 200, answer
        assert answer["model"] == server.model
        results = answer["results"]
        scores = [result["relevance_score"] for result in results]
        assert scores == sorted(scores, reverse=True)  # by score, not in the order sent
        assert [result["index"] for result in results] != list(range(len(documents)))
        # Infinity strips the whitespace around a text, in what it scores and returns.
        assert all(result["document"] == documents[result["index"]].strip() for result in results)
        assert by_index(results, len(documents)) == pytest.approx(logits[query], abs=TOLERANCE)


def test_relevance_scores_are_sigmoids_of_the_logits_and_top_n_keeps_the_best(
    server: InfinityServer, logits: dict[str, list[float]]
) -> None:
    top_n = 4
    for query, documents in DOCUMENTS.items():
        status, answer = rerank(server, {"query": query, "documents": list(documents)})

        assert status == 200, answer
        assert all(result.get("document") is None for result in answer["results"])
        expected = [1 / (1 + math.exp(-logit)) for logit in logits[query]]
        assert by_index(answer["results"], len(documents)) == pytest.approx(expected, abs=TOLERANCE)

        status, answer = rerank(
            server, {"query": query, "documents": list(documents), "top_n": top_n}
        )

        assert status == 200, answer
        best = sorted(range(len(documents)), key=lambda i: logits[query][i], reverse=True)
        assert [result["index"] for result in answer["results"]] == best[:top_n]


def test_more_documents_than_the_client_batch_limit_are_refused_before_inference(
    server: InfinityServer,
) -> None:
    documents = [f"document {i}" for i in range(MAX_CLIENT_BATCH_SIZE + 1)]

    status, answer = rerank(server, {"query": "a query", "documents": documents})

    assert status == 422, answer
    status, answer = rerank(server, {"query": "a query", "documents": documents[:-1]})
    assert status == 200, answer
    assert len(answer["results"]) == MAX_CLIENT_BATCH_SIZE
