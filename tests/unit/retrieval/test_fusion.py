import math
from collections.abc import Callable

import pytest

from sidecar.retrieval.fusion import (
    Candidate,
    RetrieverHit,
    SourceRank,
    attach_provenance,
    fuse_convex,
    fuse_rrf,
)


def hits(*pairs: tuple[str, float]) -> list[RetrieverHit]:
    return [
        RetrieverHit(index="docs", id=doc_id, score=score, source={"title": doc_id})
        for doc_id, score in pairs
    ]


def by_id(candidates: list[Candidate]) -> dict[str, Candidate]:
    return {c.id: c for c in candidates}


LEXICAL = hits(("a", 10.0), ("b", 6.0), ("c", 2.0))
VECTOR = hits(("b", 0.9), ("d", 0.5), ("a", 0.3))


def test_rrf_scores_are_the_weighted_reciprocal_rank_sum() -> None:
    fused = by_id(fuse_rrf(LEXICAL, VECTOR))
    # a: lexical rank 1, vector rank 3; b: lexical 2, vector 1; c: lexical 3; d: vector 2.
    assert fused["a"].fused_score == pytest.approx(1 / 61 + 1 / 63)
    assert fused["b"].fused_score == pytest.approx(1 / 62 + 1 / 61)
    assert fused["c"].fused_score == pytest.approx(1 / 63)
    assert fused["d"].fused_score == pytest.approx(1 / 62)


def test_rrf_sorts_by_fused_score() -> None:
    # b (1/61 + 1/62) > a (1/61 + 1/63) > d (1/62) > c (1/63)
    assert [c.id for c in fuse_rrf(LEXICAL, VECTOR)] == ["b", "a", "d", "c"]


def test_rrf_rank_constant_and_weights_enter_the_formula() -> None:
    fused = by_id(fuse_rrf(LEXICAL, VECTOR, rank_constant=1, weights=(2.0, 0.5)))
    # a: 2/(1+1) + 0.5/(1+3) = 1.125; d: 0.5/(1+2) = 1/6
    assert fused["a"].fused_score == pytest.approx(1.125)
    assert fused["d"].fused_score == pytest.approx(1 / 6)


def test_provenance_records_exact_ranks_and_raw_scores() -> None:
    for fused in (fuse_rrf(LEXICAL, VECTOR), fuse_convex(LEXICAL, VECTOR)):
        candidates = by_id(fused)
        assert candidates["b"].provenance == "both"
        assert candidates["b"].lexical == SourceRank(rank=2, score=6.0)
        assert candidates["b"].vector == SourceRank(rank=1, score=0.9)
        assert candidates["c"].provenance == "lexical_only"
        assert candidates["c"].lexical == SourceRank(rank=3, score=2.0)
        assert candidates["c"].vector is None
        assert candidates["d"].provenance == "vector_only"
        assert candidates["d"].lexical is None
        assert candidates["d"].vector == SourceRank(rank=2, score=0.5)


def test_source_comes_from_the_lexical_hit_when_both_lists_have_it() -> None:
    lexical = [RetrieverHit("docs", "a", 1.0, {"from": "lexical"})]
    vector = [
        RetrieverHit("docs", "a", 0.5, {"from": "vector"}),
        RetrieverHit("docs", "v", 0.4, {"from": "vector"}),
    ]
    fused = by_id(fuse_rrf(lexical, vector))
    assert fused["a"].source == {"from": "lexical"}
    assert fused["v"].source == {"from": "vector"}


@pytest.mark.parametrize("fuse", [fuse_rrf, fuse_convex])
def test_one_id_in_two_indexes_is_two_documents_and_both_means_same_index_and_id(
    fuse: Callable[..., list[Candidate]],
) -> None:
    # Two generations behind one alias share id "a"; the vector list found only the older one.
    lexical = [
        RetrieverHit("docs-000002", "a", 3.0, {"gen": 2}),
        RetrieverHit("docs-000001", "a", 2.0, {"gen": 1}),
    ]
    vector = [RetrieverHit("docs-000001", "a", 0.9, {"gen": 1})]
    fused = {(c.index, c.id): c for c in fuse(lexical, vector)}
    assert set(fused) == {("docs-000001", "a"), ("docs-000002", "a")}
    assert fused["docs-000001", "a"].provenance == "both"
    assert fused["docs-000001", "a"].lexical == SourceRank(rank=2, score=2.0)
    assert fused["docs-000002", "a"].provenance == "lexical_only"
    assert fused["docs-000002", "a"].source == {"gen": 2}


def test_server_fused_hits_find_their_ranks_by_index_and_id() -> None:
    fused = [RetrieverHit("new", "a", 0.9, {}), RetrieverHit("old", "a", 0.8, {})]
    lexical = [RetrieverHit("old", "a", 5.0, {})]
    vector = [RetrieverHit("new", "a", 0.7, {})]
    candidates = attach_provenance(fused, lexical, vector)
    assert [(c.index, c.provenance) for c in candidates] == [
        ("new", "vector_only"),
        ("old", "lexical_only"),
    ]


def test_equal_scores_are_ordered_by_best_rank_then_id() -> None:
    lexical = hits(("l1", 9.0), ("l2", 8.0), ("a", 7.0))
    vector = hits(("z", 0.9))
    # rank_constant=1, weights (2, 1): l1 = 2/2, l2 = 2/3, a = 2/4 = 0.5, z = 1/2 = 0.5 exactly.
    # a and z tie; z's best rank (1) beats a's (3) although "a" < "z".
    ordered = fuse_rrf(lexical, vector, rank_constant=1, weights=(2.0, 1.0))
    assert [c.id for c in ordered] == ["l1", "l2", "z", "a"]
    # Same score and same best rank (1 in each list): id decides.
    assert [c.id for c in fuse_rrf(hits(("y", 1.0)), hits(("x", 1.0)))] == ["x", "y"]


def test_duplicates_keep_the_first_occurrence_and_ranks_stay_contiguous() -> None:
    lexical = hits(("a", 5.0), ("b", 4.0), ("a", 3.0), ("c", 2.0))
    fused = by_id(fuse_rrf(lexical, []))
    assert len(fused) == 3
    assert fused["a"].lexical == SourceRank(rank=1, score=5.0)
    assert fused["c"].lexical == SourceRank(rank=3, score=2.0)
    assert fused["c"].fused_score == pytest.approx(1 / 63)


def test_non_finite_scores_rank_last_and_do_not_poison_fusion() -> None:
    lexical = hits(("n", math.nan), ("a", 3.0), ("i", math.inf), ("b", 1.0))
    vector = hits(("a", 0.8), ("m", -math.inf))
    for fused in (fuse_rrf(lexical, vector), fuse_convex(lexical, vector)):
        candidates = by_id(fused)
        assert all(math.isfinite(c.fused_score) for c in fused)
        # Finite hits keep their order; the non-finite ones follow in theirs.
        assert candidates["a"].lexical == SourceRank(rank=1, score=3.0)
        assert candidates["b"].lexical is not None
        assert candidates["b"].lexical.rank == 2
        n_rank = candidates["n"].lexical
        assert n_rank is not None
        assert n_rank.rank == 3
        assert math.isnan(n_rank.score)  # the raw score is reported as returned
        assert candidates["i"].lexical == SourceRank(rank=4, score=math.inf)
        assert candidates["m"].vector == SourceRank(rank=2, score=-math.inf)


def test_convex_treats_a_non_finite_score_as_the_lists_worst() -> None:
    lexical = hits(("n", math.nan), ("a", 3.0), ("b", 1.0))
    fused = by_id(fuse_convex(lexical, []))
    # n fuses with b's score 1.0: norm (1 - 1) / (3 - 1) = 0, times weight share 0.5.
    assert fused["n"].fused_score == 0.0
    assert fused["b"].fused_score == 0.0
    assert fused["a"].fused_score == pytest.approx(0.5)


def test_convex_scores_are_weighted_min_max_sums() -> None:
    fused = fuse_convex(LEXICAL, VECTOR)
    scores = {c.id: c.fused_score for c in fused}
    # norm_lex: a (10-2)/8 = 1, b (6-2)/8 = 0.5, c 0; norm_vec: b (0.9-0.3)/0.6 = 1,
    # d (0.5-0.3)/0.6 = 1/3, a 0.  Weights 0.5 each.
    assert scores["a"] == pytest.approx(0.5 * 1 + 0.5 * 0)
    assert scores["b"] == pytest.approx(0.5 * 0.5 + 0.5 * 1)
    assert scores["c"] == pytest.approx(0.5 * 0)
    assert scores["d"] == pytest.approx(0.5 * (1 / 3))
    assert [c.id for c in fused] == ["b", "a", "d", "c"]


def test_convex_weights_are_divided_by_their_sum() -> None:
    scaled = fuse_convex(LEXICAL, VECTOR, weights=(3.0, 1.0))
    unit = fuse_convex(LEXICAL, VECTOR, weights=(0.75, 0.25))
    assert [c.id for c in scaled] == [c.id for c in unit]
    assert [c.fused_score for c in scaled] == pytest.approx([c.fused_score for c in unit])
    scores = {c.id: c.fused_score for c in scaled}
    # a: 0.75 * 1 = 0.75; b: 0.75 * 0.5 + 0.25 * 1 = 0.625
    assert scores["a"] == pytest.approx(0.75)
    assert scores["b"] == pytest.approx(0.625)
    assert all(0.0 <= c.fused_score <= 1.0 for c in scaled)


def test_convex_ties_at_zero_fall_back_to_best_rank() -> None:
    # c (lexical rank 3) and a list-minimum d at vector rank 2 both score 0.
    vector = hits(("b", 0.9), ("d", 0.3))
    fused = fuse_convex(LEXICAL, vector)
    assert [c.id for c in fused][-2:] == ["d", "c"]


def test_convex_constant_list_normalizes_to_one() -> None:
    fused = by_id(fuse_convex([], hits(("x", 0.7), ("y", 0.7)), weights=(1.0, 3.0)))
    # norm 1.0 for both, weight share 3/4
    assert fused["x"].fused_score == pytest.approx(0.75)
    assert fused["y"].fused_score == pytest.approx(0.75)


def test_convex_list_of_only_non_finite_scores_is_treated_as_constant() -> None:
    fused = by_id(fuse_convex(hits(("p", math.nan), ("q", math.inf)), []))
    assert fused["p"].fused_score == pytest.approx(0.5)
    assert fused["q"].fused_score == pytest.approx(0.5)


def test_empty_inputs_give_no_candidates() -> None:
    assert fuse_rrf([], []) == []
    assert fuse_convex([], []) == []
    assert attach_provenance([], LEXICAL, VECTOR) == []


@pytest.mark.parametrize(
    "weights", [(-0.1, 1.0), (1.0, -1.0), (0.0, 0.0), (math.nan, 1.0), (math.inf, 1.0)]
)
def test_bad_weights_are_rejected(weights: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="weights"):
        fuse_rrf(LEXICAL, VECTOR, weights=weights)
    with pytest.raises(ValueError, match="weights"):
        fuse_convex(LEXICAL, VECTOR, weights=weights)


def test_one_zero_weight_is_allowed() -> None:
    fused = by_id(fuse_convex(LEXICAL, VECTOR, weights=(0.0, 1.0)))
    assert fused["c"].fused_score == 0.0
    assert fused["b"].fused_score == pytest.approx(1.0)


@pytest.mark.parametrize("rank_constant", [0, -60])
def test_rank_constant_below_one_is_rejected(rank_constant: int) -> None:
    with pytest.raises(ValueError, match="rank_constant"):
        fuse_rrf(LEXICAL, VECTOR, rank_constant=rank_constant)


def test_attach_provenance_keeps_server_order_and_scores() -> None:
    fused = [
        RetrieverHit("docs", "a", 0.9, {"from": "fused"}),
        RetrieverHit("docs", "z", 0.8, {"from": "fused"}),
        RetrieverHit("docs", "b", 0.5, {"from": "fused"}),
    ]
    candidates = attach_provenance(fused, LEXICAL, VECTOR)
    assert [(c.id, c.fused_score) for c in candidates] == [("a", 0.9), ("z", 0.8), ("b", 0.5)]
    assert all(c.source == {"from": "fused"} for c in candidates)
    a, z, b = candidates
    assert a.provenance == "both"
    assert a.lexical == SourceRank(rank=1, score=10.0)
    assert a.vector == SourceRank(rank=3, score=0.3)
    assert z.provenance == "neither"
    assert z.lexical is None
    assert z.vector is None
    assert b.lexical == SourceRank(rank=2, score=6.0)
    assert b.vector == SourceRank(rank=1, score=0.9)


def test_attach_provenance_with_a_doc_missing_from_one_list() -> None:
    fused = hits(("c", 0.7), ("d", 0.6))
    c, d = attach_provenance(fused, LEXICAL, VECTOR)
    assert (c.provenance, c.lexical, c.vector) == ("lexical_only", SourceRank(3, 2.0), None)
    assert (d.provenance, d.lexical, d.vector) == ("vector_only", None, SourceRank(2, 0.5))


def test_attach_provenance_cleans_the_fused_list() -> None:
    fused = hits(("n", math.nan), ("a", 0.9), ("b", 0.4), ("a", 0.1))
    candidates = attach_provenance(fused, LEXICAL, VECTOR)
    # Duplicate a dropped; n moves last and takes the lowest finite fused score.
    assert [(c.id, c.fused_score) for c in candidates] == [("a", 0.9), ("b", 0.4), ("n", 0.4)]
