"""The cross-encoder backend on the real bundled MiniLM (a seeded fresh head): prepare on its
thread and score on the model's, at the same time, give exactly what each gives alone."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from sidecar.rerank.backend import CrossEncoderBackend, ScoringPair, build_untrained_cross_encoder

MAX_LENGTH_TOKENS = 64
QUERY = "how do volcanoes erupt"
# From a few tokens to several hundred: past the model's length, so prepare counts (and chunks)
# untruncated while score truncates and pads.
TEXTS = [" ".join(["magma rises through the crust and erupts as lava"] * n) for n in (1, 9, 60)]
SCORE_CALLS = 60


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> CrossEncoderBackend:
    model = build_untrained_cross_encoder(tmp_path_factory.mktemp("models") / "cross-encoder")
    return CrossEncoderBackend(
        str(model), device="cpu", dtype="float32", max_length=MAX_LENGTH_TOKENS
    )


def prepare(backend: CrossEncoderBackend) -> list[list[ScoringPair]]:
    return backend.prepare(QUERY, TEXTS, "max_chunk", overlap_tokens=8)


def score(backend: CrossEncoderBackend) -> list[float]:
    return backend.score([ScoringPair(QUERY, text, MAX_LENGTH_TOKENS) for text in TEXTS])


def test_prepare_and_score_on_their_own_threads_at_once_match_each_alone(
    backend: CrossEncoderBackend,
) -> None:
    # A fast tokenizer's truncation and padding are state that every call sets: shared by the
    # two threads, one call's settings leak into the other's (score then fails to make a
    # tensor of unpadded rows, or prepare counts truncated lengths).
    prepared, scored = prepare(backend), score(backend)
    assert len(prepared[-1]) > 1, "the longest text is chunked"
    scoring_done = threading.Event()

    def prepare_until_scoring_is_done() -> list[list[list[ScoringPair]]]:
        results = [prepare(backend)]
        while not scoring_done.is_set():
            results.append(prepare(backend))
        return results

    def score_repeatedly() -> list[list[float]]:
        try:
            return [score(backend) for _ in range(SCORE_CALLS)]
        finally:
            scoring_done.set()

    with (
        ThreadPoolExecutor(1, thread_name_prefix="prepare") as prepare_executor,
        ThreadPoolExecutor(1, thread_name_prefix="model") as model_executor,
    ):
        preparing = prepare_executor.submit(prepare_until_scoring_is_done)
        scoring = model_executor.submit(score_repeatedly)
        all_scores, all_prepared = scoring.result(), preparing.result()
    assert len(all_prepared) > SCORE_CALLS, "prepare ran all along the scoring"
    assert all(result == prepared for result in all_prepared)
    assert all(result == pytest.approx(scored, abs=1e-5) for result in all_scores)
