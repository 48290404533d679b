"""The real cross-encoder backend: precision, batching and long-document handling, measured
against the model itself (a small cross-encoder built offline), never against hard-coded scores."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from sidecar.indexing.sample import sample_documents
from sidecar.rerank.backend import CrossEncoderBackend, ScoringPair

QUERY = "how do I catch an exception"
# Stated tolerance for reduced precision: bf16 logits stay within 10% of the spread of the fp32
# logits, and at most 2.5% of document pairs change order (Kendall tau >= 0.95).
MAX_DIFF_SHARE_OF_SPREAD = 0.10
MAX_DISCORDANT_SHARE = 0.025


@pytest.fixture(scope="module")
def fp32(tiny_cross_encoder: Path) -> CrossEncoderBackend:
    return CrossEncoderBackend(
        str(tiny_cross_encoder), device="cpu", dtype="float32", max_length=256
    )


@pytest.fixture(scope="module")
def pairs(fp32: CrossEncoderBackend) -> list[ScoringPair]:
    texts = [doc.embedding_text for doc in itertools.islice(sample_documents(), 60)]
    return [chunks[0] for chunks in fp32.prepare(QUERY, texts, "first", 0)]


def test_bf16_keeps_the_fp32_ranking_within_tolerance(
    tiny_cross_encoder: Path, fp32: CrossEncoderBackend, pairs: list[ScoringPair]
) -> None:
    bf16 = CrossEncoderBackend(
        str(tiny_cross_encoder), device="cpu", dtype="bfloat16", max_length=256
    )
    exact, reduced = np.array(fp32.score(pairs)), np.array(bf16.score(pairs))
    assert np.abs(exact - reduced).max() <= MAX_DIFF_SHARE_OF_SPREAD * exact.std()
    discordant = sum(
        (exact[i] - exact[j]) * (reduced[i] - reduced[j]) < 0
        for i, j in itertools.combinations(range(len(pairs)), 2)
    )
    assert discordant / (len(pairs) * (len(pairs) - 1) / 2) <= MAX_DISCORDANT_SHARE


def test_batched_scores_equal_one_at_a_time(
    fp32: CrossEncoderBackend, pairs: list[ScoringPair]
) -> None:
    batched = fp32.score(pairs[:12])
    alone = [fp32.score([pair])[0] for pair in pairs[:12]]
    assert batched == pytest.approx(alone, abs=1e-5)


def test_token_lengths_are_capped_at_the_model_maximum(
    fp32: CrossEncoderBackend, pairs: list[ScoringPair]
) -> None:
    assert all(1 <= pair.token_length <= fp32.max_length for pair in pairs)
    assert max(pair.token_length for pair in pairs) == fp32.max_length, "some sections are longer"


def test_max_chunk_covers_the_whole_document_with_overlap(tiny_cross_encoder: Path) -> None:
    backend = CrossEncoderBackend(
        str(tiny_cross_encoder), device="cpu", dtype="float32", max_length=64
    )
    sentences = [f"Sentence number {n} talks about topic {n}." for n in range(60)]
    text = " ".join(sentences)
    (chunks,) = backend.prepare("topic", [text], "max_chunk", 8)
    (single,) = backend.prepare("topic", [text], "first", 8)
    assert len(single) == 1
    assert len(chunks) > 3
    assert chunks[0].text.startswith("Sentence number 0")
    assert chunks[-1].text.endswith("topic 59.")
    assert all(pair.token_length <= 64 for pair in chunks)
    for before, after in itertools.pairwise(chunks):
        assert before.text[-10:] in after.text, "consecutive chunks overlap"
    covered = " ".join(chunk.text for chunk in chunks)
    assert all(sentence.split(" talks")[0] in covered for sentence in sentences)


def test_short_documents_are_one_pair_in_either_mode(fp32: CrossEncoderBackend) -> None:
    (first,) = fp32.prepare(QUERY, ["a short text"], "first", 8)
    (chunked,) = fp32.prepare(QUERY, ["a short text"], "max_chunk", 8)
    assert first == chunked
    assert len(first) == 1


def test_best_passage_scores_the_one_window_that_holds_the_query(
    tiny_cross_encoder: Path,
) -> None:
    backend = CrossEncoderBackend(
        str(tiny_cross_encoder), device="cpu", dtype="float32", max_length=64
    )
    filler = " ".join(f"Sentence {n} is about nothing in particular." for n in range(30))
    text = f"{filler} The volcano erupted lava and ash over the caldera. {filler}"
    (chunks,) = backend.prepare("volcano lava caldera", [text], "max_chunk", 8)
    (best,) = backend.prepare("volcano lava caldera", [text], "best_passage", 8)
    assert len(chunks) > 3
    assert len(best) == 1, "one pair per document, whatever its length"
    assert "volcano erupted lava" in best[0].text
    assert best[0] in chunks, "the chosen window is one of max_chunk's windows"
    (short,) = backend.prepare("volcano lava caldera", [text], "best_passage", 8, 16)
    assert short[0].token_length < best[0].token_length, "passage_tokens bounds the window"
    assert "lava" in short[0].text
