"""The remote rerank tier's pure logic: each server's request shape, scores mapped back by index
(never by the order results come in), probabilities turned back into logits; the scorer's split
into calls, its bound on calls in flight, Retry-After, fail-open reasons and circuit breaker. The
server is a function answering canned responses (the real servers have integration tests)."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from prometheus_client import CollectorRegistry

from sidecar.metrics import Metrics
from sidecar.rerank.backend import ScoringPair
from sidecar.rerank.remote.apis import DEFAULTS, AnswerError, Call, RemoteKind, RerankApi
from sidecar.rerank.remote.scorer import Answer, RemoteScorer, TierLimits, TierUnavailable

TEXTS = ["first", "second", "third"]


def api(kind: RemoteKind, max_batch: int | None = None) -> RerankApi:
    default_batch, scores = DEFAULTS[kind]
    return RerankApi(kind, "reranker", max_batch or default_batch, scores)


def sorted_answer(kind: RemoteKind, scores: Sequence[float]) -> Any:
    """What each server answers for `scores`, results sorted best first where the API sorts."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    if kind == "tei":
        return [{"index": i, "score": scores[i]} for i in order]
    if kind == "cohere":
        return {"results": [{"index": i, "relevance_score": scores[i]} for i in order]}
    if kind == "kserve":
        return {"outputs": [{"name": "score", "shape": [len(scores)], "data": list(scores)}]}
    return {"inference_results": [{"output": [{"name": "s", "data": [s]}]} for s in scores]}


@pytest.mark.parametrize("kind", ["tei", "kserve", "opensearch-ml"])
def test_logits_map_back_by_index_not_by_the_order_results_come_in(kind: RemoteKind) -> None:
    assert api(kind).logits(sorted_answer(kind, [-1.0, 3.0, 0.5]), 3) == [-1.0, 3.0, 0.5]


def test_probabilities_are_turned_back_into_the_logits_they_came_from() -> None:
    logits = [-2.0, 0.0, 4.5]
    probabilities = [1 / (1 + math.exp(-x)) for x in logits]
    back = api("cohere").logits(sorted_answer("cohere", probabilities), 3)
    assert back == pytest.approx(logits, abs=1e-9)
    # A saturated probability stays a finite, large logit.
    assert math.isfinite(api("cohere").logits(sorted_answer("cohere", [1.0, 0.0]), 2)[0])


@pytest.mark.parametrize(
    ("kind", "answer"),
    [
        ("tei", [{"index": 0, "score": 1.0}, {"index": 1, "score": 2.0}]),  # one missing
        ("tei", [{"index": 0, "score": 1.0}, {"index": 1, "score": 2.0}, {"index": 3, "score": 0}]),
        ("tei", [{"index": True, "score": 1.0}] * 3),
        ("cohere", {"results": [{"index": i, "relevance_score": "high"} for i in range(3)]}),
        ("kserve", {"outputs": [{"name": "score", "data": [1.0, 2.0]}]}),
        ("opensearch-ml", {"inference_results": []}),
        ("cohere", {"error": "model not found"}),
    ],
)
def test_an_answer_of_another_shape_is_refused_not_guessed(kind: RemoteKind, answer: Any) -> None:
    with pytest.raises(AnswerError):
        api(kind).logits(answer, 3)


def test_each_server_gets_its_own_request_shape() -> None:
    assert api("tei").call("q", TEXTS) == Call(
        "POST",
        "/rerank",
        {
            "query": "q",
            "texts": TEXTS,
            "raw_scores": True,
            "truncate": True,
            "truncation_direction": "Right",
        },
    )
    cohere = api("cohere").call("q", TEXTS)
    assert (cohere.path, cohere.body["documents"], cohere.body["top_n"]) == ("/rerank", TEXTS, 3)
    kserve = api("kserve").call("q", TEXTS)
    assert kserve.path == "/v2/models/reranker/infer"
    assert [i["data"] for i in kserve.body["inputs"]] == [["q"] * 3, TEXTS]
    ml = RerankApi("opensearch-ml", "abc/1", 32, "logit").call("q", TEXTS)
    assert (ml.path, ml.body) == (
        "/_plugins/_ml/models/abc%2F1/_predict",
        {"query_text": "q", "text_docs": TEXTS},
    )


class Tier:
    """A tier answering each call with `respond(call)`; records the calls and the most calls in
    flight at once."""

    def __init__(self, respond: Callable[[Call], Answer]) -> None:
        self.respond = respond
        self.calls: list[Call] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def send(self, call: Call) -> Answer:
        self.calls.append(call)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0)  # let the other parts start
            return self.respond(call)
        finally:
            self.in_flight -= 1


def scores_by_text(call: Call) -> Answer:
    """TEI answers whose score is the document's number: "d7" scores 7."""
    texts = call.body["texts"]
    return Answer(200, {}, sorted_answer("tei", [float(t[1:]) for t in texts]))


def pairs(query: str, count: int, start: int = 0) -> list[tuple[ScoringPair, int]]:
    return [(ScoringPair(query, f"d{i}", 4), 4) for i in range(start, start + count)]


def scorer(tier: Tier, limits: TierLimits | None = None, max_batch: int = 4) -> RemoteScorer:
    return RemoteScorer(
        api("tei", max_batch), tier.send, limits or TierLimits(), Metrics(CollectorRegistry())
    )


def test_pairs_split_at_the_batch_limit_and_the_query_and_come_back_in_order() -> None:
    tier = Tier(scores_by_text)
    items = pairs("a", 10) + pairs("b", 3, start=10)
    logits = asyncio.run(scorer(tier, TierLimits(concurrency=2)).submit(items))
    assert logits == [float(i) for i in range(13)]
    assert [(c.body["query"], len(c.body["texts"])) for c in tier.calls] == [
        ("a", 4),
        ("a", 4),
        ("a", 2),
        ("b", 3),
    ]
    assert tier.most_in_flight == 2, "the bound on calls in flight holds"


def test_a_retry_after_within_bounds_is_waited_out_once() -> None:
    answers = iter([Answer(429, {"Retry-After": "0"}, None)])

    def respond(call: Call) -> Answer:
        return next(answers, None) or scores_by_text(call)

    tier = Tier(respond)
    assert asyncio.run(scorer(tier).submit(pairs("a", 2))) == [0.0, 1.0]
    assert len(tier.calls) == 2


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (Answer(429, {}, None), "backend_overloaded"),  # no Retry-After: nothing to wait for
        (Answer(503, {"Retry-After": "30"}, None), "backend_overloaded"),  # longer than allowed
        (Answer(500, {}, {"error": "boom"}), "backend_error"),
        (Answer(200, {}, {"unexpected": True}), "backend_error"),
    ],
)
def test_a_tier_that_does_not_score_fails_with_the_reason_reported(
    answer: Answer, reason: str
) -> None:
    tier = Tier(lambda call: answer)
    with pytest.raises(TierUnavailable) as caught:
        asyncio.run(scorer(tier).submit(pairs("a", 2)))
    assert caught.value.reason == reason


def test_an_unreachable_tier_is_a_backend_error() -> None:
    async def refuse(call: Call) -> Answer:
        raise ConnectionRefusedError("connection refused")

    remote = RemoteScorer(api("tei"), refuse, TierLimits(), Metrics(CollectorRegistry()))
    with pytest.raises(TierUnavailable) as caught:
        asyncio.run(remote.submit(pairs("a", 2)))
    assert caught.value.reason == "backend_error"


def test_the_breaker_opens_refuses_without_calling_then_lets_one_trial_through() -> None:
    failing = True

    def respond(call: Call) -> Answer:
        return Answer(500, {}, None) if failing else scores_by_text(call)

    tier = Tier(respond)
    remote = scorer(tier, TierLimits(failure_threshold=2, open_s=0.0))

    async def scenario() -> None:
        nonlocal failing
        for _ in range(2):
            with pytest.raises(TierUnavailable):
                await remote.submit(pairs("a", 1))
        assert remote.breaker.state == "open"
        failing = False
        # open_s 0: the next request is the half-open trial, and it succeeds.
        assert await remote.submit(pairs("a", 1)) == [0.0]
        assert remote.breaker.state == "closed"

    asyncio.run(scenario())


def test_while_open_nothing_reaches_the_tier() -> None:
    tier = Tier(lambda call: Answer(500, {}, None))
    remote = scorer(tier, TierLimits(failure_threshold=1, open_s=60.0))

    async def scenario() -> None:
        with pytest.raises(TierUnavailable):
            await remote.submit(pairs("a", 1))
        calls = len(tier.calls)
        with pytest.raises(TierUnavailable) as caught:
            await remote.submit(pairs("a", 1))
        assert caught.value.reason == "backend_error"
        assert len(tier.calls) == calls

    asyncio.run(scenario())


def test_cancelling_a_request_cancels_its_calls_in_flight() -> None:
    """The caller's deadline cancels submit: no call to the tier outlives it."""
    started, cancelled = asyncio.Event(), []

    async def hang(call: Call) -> Answer:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(call)
            raise
        raise AssertionError("never answers")

    remote = RemoteScorer(api("tei", 1), hang, TierLimits(), Metrics(CollectorRegistry()))

    async def scenario() -> None:
        task = asyncio.create_task(remote.submit(pairs("a", 3)))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert len(cancelled) == 3


TEI_OPENAPI = Path(__file__).parent / "fixtures" / "tei_openapi_rerank.json"


def tei_validator(name: str) -> jsonschema.Validator:
    """TEI's published schema `name` (an excerpt of its OpenAPI document, fetched as a fact: TEI
    cannot be run here), closed to keys it does not define."""
    schemas = json.loads(TEI_OPENAPI.read_text())["schemas"]
    for schema in schemas.values():
        if schema.get("type") == "object":
            schema["additionalProperties"] = False
    root = {"components": {"schemas": schemas}, **schemas[name]}
    return jsonschema.Draft7Validator(root)


def test_the_tei_call_and_answer_are_of_teis_published_shapes() -> None:
    call = api("tei").call("q", TEXTS)
    tei_validator("RerankRequest").validate(call.body)
    answer = sorted_answer("tei", [0.5, -1.0, 2.0])
    tei_validator("RerankResponse").validate(answer)
    assert api("tei").logits(answer, 3) == [0.5, -1.0, 2.0]
