"""Token windows and the lexical choice of `best_passage`, without a model."""

from __future__ import annotations

import itertools

import pytest

from sidecar.rerank.passages import best_windows, token_windows


@pytest.mark.parametrize(("tokens", "length", "overlap"), [(10, 4, 1), (100, 30, 8), (31, 30, 8)])
def test_windows_cover_every_token_overlap_and_never_exceed_the_length(
    tokens: int, length: int, overlap: int
) -> None:
    spans = token_windows(tokens, length, overlap)
    assert spans[0][0] == 0
    assert spans[-1][1] == tokens
    assert all(end - start <= length for start, end in spans)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start == end - overlap, "each window starts `overlap` tokens before the last ended"


def test_a_document_that_fits_is_one_window() -> None:
    assert token_windows(30, 30, 8) == [(0, 30)]
    assert token_windows(0, 30, 8) == [(0, 0)]


def test_no_window_is_contained_in_the_one_before() -> None:
    spans = token_windows(100, 30, 8)
    assert spans == [(0, 30), (22, 52), (44, 74), (66, 96), (88, 100)]


def test_the_window_holding_the_query_terms_wins() -> None:
    query = [7, 8]
    documents = [[[1, 2, 3], [4, 7, 8], [5, 6, 9]], [[7, 1, 1], [2, 2, 2]]]
    assert best_windows(query, documents) == [1, 0]


def test_rare_terms_count_more_than_common_ones() -> None:
    # Token 5 is in every window, token 9 in one: the window with 9 wins over one with 5 twice.
    documents = [[[5, 5, 1], [9, 2, 5]], [[5, 3, 3]], [[5, 4, 4]]]
    assert best_windows([5, 9], documents)[0] == 1


def test_no_shared_term_keeps_the_first_window_as_first_truncation_would() -> None:
    assert best_windows([42], [[[1, 2], [3, 4], [5, 6]]]) == [0]
    assert best_windows([1], [[[2], [1], [1]]]) == [1], "the earliest of equal windows"


def test_no_documents_no_choice() -> None:
    assert best_windows([1], []) == []
