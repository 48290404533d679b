"""The KServe v2 server of the remote-reranker tests (kserve_server.py) on the tests' cross-encoder:
health, readiness and metadata as the v2 protocol answers them, scores equal to the in-process
torch runtime's on the same pairs, long documents cut at the same length, bad requests refused."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.rerank.backend import CrossEncoderBackend
from tests.integration.kserve_server import (
    KServeError,
    KServeServer,
    kserve_python,
    running_kserve,
)
from tests.integration.model_servers import MAX_LENGTH, call_json, install_uncaptured

pytestmark = pytest.mark.integration

# Same weights, same torch, fp32 on both sides: at most float rounding differs (observed: none;
# the pairs' logits span -0.37 to 0.33 and lie at least 2.7e-4 apart).
TOLERANCE = 1e-5
QUERIES = (
    "how do volcanoes erupt",
    "baking sourdough bread at home",
    "offside rule in football",
    "how vaccines train the immune system",
)
DOCUMENTS = (
    "Magma rises through a vent and erupts as lava and ash.",
    "Knead the dough, let the yeast proof it overnight, then bake it in a hot oven.",
    "A player is offside when nearer the goal line than the ball and the second-last defender.",
    "A vaccine shows the immune system an antigen so that memory cells answer a later infection.",
    "Glaciers carve fjords; their meltwater leaves moraines behind.",
)
PAIRS = [(query, document) for query in QUERIES for document in DOCUMENTS]


@pytest.fixture(scope="module")
def server(tiny_cross_encoder: Path, pytestconfig: pytest.Config) -> Iterator[KServeServer]:
    install_uncaptured(pytestconfig, kserve_python)
    with running_kserve(tiny_cross_encoder, max_length=MAX_LENGTH) as running:
        yield running


@pytest.fixture(scope="module")
def in_process(tiny_cross_encoder: Path) -> CrossEncoderBackend:
    return CrossEncoderBackend(
        str(tiny_cross_encoder),
        device="cpu",
        dtype="float32",
        runtime="torch",
        max_length=MAX_LENGTH,
    )


def infer_body(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    def tensor(name: str, texts: list[str]) -> dict[str, Any]:
        return {"name": name, "shape": [len(texts)], "datatype": "BYTES", "data": texts}

    return {
        "id": "test",
        "inputs": [
            tensor("query", [query for query, _ in pairs]),
            tensor("document", [document for _, document in pairs]),
        ],
    }


def remote_scores(server: KServeServer, pairs: list[tuple[str, str]]) -> list[float]:
    status, answer = call_json(f"{server.url}/v2/models/{server.model}/infer", infer_body(pairs))
    assert status == 200, answer
    assert answer["model_name"] == server.model
    assert answer["id"] == "test"
    (output,) = answer["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("score", "FP32", [len(pairs)])
    scores: list[float] = output["data"]
    return scores


def local_scores(backend: CrossEncoderBackend, pairs: list[tuple[str, str]]) -> list[float]:
    prepared = [
        pair
        for query, document in pairs
        for (pair,) in backend.prepare(query, [document], "first", overlap_tokens=0)
    ]
    return backend.score(prepared)


def test_health_readiness_and_metadata(server: KServeServer) -> None:
    assert call_json(f"{server.url}/v2/health/ready") == (200, {"ready": True})
    assert call_json(f"{server.url}/v2/models/{server.model}/ready") == (
        200,
        {"name": server.model, "ready": True},
    )
    status, metadata = call_json(f"{server.url}/v2/models/{server.model}")
    assert status == 200
    assert metadata["inputs"] == [
        {"name": "query", "datatype": "BYTES", "shape": [-1]},
        {"name": "document", "datatype": "BYTES", "shape": [-1]},
    ]
    assert metadata["outputs"] == [{"name": "score", "datatype": "FP32", "shape": [-1]}]
    assert call_json(f"{server.url}/v2/models/absent/ready")[0] == 404


def test_scores_equal_the_in_process_runtime(
    server: KServeServer, in_process: CrossEncoderBackend
) -> None:
    expected = local_scores(in_process, PAIRS)
    # The untrained head's scores are noise, but distinct noise: apart by more than the
    # tolerance, so a score returned for another pair, or out of order, fails.
    ordered = sorted(expected)
    assert min(b - a for a, b in itertools.pairwise(ordered)) > 2 * TOLERANCE
    assert remote_scores(server, PAIRS) == pytest.approx(expected, abs=TOLERANCE)


def test_long_document_cut_at_max_length(
    server: KServeServer, in_process: CrossEncoderBackend
) -> None:
    """Well past MAX_LENGTH tokens, the document's tail is not read: another tail scores the same,
    as in-process; a change within the first tokens does not."""
    head = " ".join(DOCUMENTS) * 3
    ((cut,),) = in_process.prepare(QUERIES[0], [head], "first", overlap_tokens=0)
    assert cut.token_length == MAX_LENGTH  # the pair is longer: counted at the limit
    pairs = [
        (QUERIES[0], head + " Bread rises in the oven. " * 50),
        (QUERIES[0], head + " Volcanic ash darkens the sky. " * 50),
        (QUERIES[0], "Lava. " + head),
    ]
    remote = remote_scores(server, pairs)
    assert remote == pytest.approx(local_scores(in_process, pairs), abs=TOLERANCE)
    assert remote[0] == pytest.approx(remote[1], abs=TOLERANCE)
    assert abs(remote[2] - remote[0]) > 2 * TOLERANCE


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"inputs": infer_body(PAIRS[:2])["inputs"][:1]}, "expected a BYTES input 'document'"),
        (
            {"inputs": [infer_body(PAIRS[:1])["inputs"][0], infer_body(PAIRS[:2])["inputs"][1]]},
            "1 queries but 2 documents",
        ),
    ],
    ids=["no-document", "lengths-differ"],
)
def test_malformed_request_is_400(server: KServeServer, body: dict[str, Any], message: str) -> None:
    status, answer = call_json(f"{server.url}/v2/models/{server.model}/infer", body)
    assert status == 400
    assert message in answer["error"]


def test_a_server_that_exits_fails_the_start_with_its_log(tmp_path: Path) -> None:
    missing = tmp_path / "no-model-here"
    with pytest.raises(KServeError, match="exited with") as failure, running_kserve(missing):
        pytest.fail("a server without its model must not start")
    assert "no-model-here" in str(failure.value)
