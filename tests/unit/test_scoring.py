import math

import pytest

from sidecar.scoring import (
    Normalization,
    blend,
    minmax_first_stage,
    normalize_scores,
    rerank_order,
)

METHODS: tuple[Normalization, ...] = ("sigmoid", "minmax", "zscore")


def test_sigmoid_is_the_logistic_function() -> None:
    assert normalize_scores([0.0, 2.0, -2.0], "sigmoid") == pytest.approx(
        [0.5, 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(2.0))]
    )


def test_sigmoid_is_stable_at_extreme_logits() -> None:
    # Warnings are errors here, so an overflow inside exp would fail this test.
    assert normalize_scores([1000.0, -1000.0], "sigmoid") == [1.0, 0.0]


def test_sigmoid_is_per_score_so_it_compares_across_requests() -> None:
    alone = normalize_scores([1.5], "sigmoid")
    among_others = normalize_scores([-3.0, 1.5, 7.0], "sigmoid")
    assert among_others[1] == alone[0]


def test_minmax_spans_zero_to_one() -> None:
    # (x - 2) / (6 - 2)
    assert normalize_scores([2.0, 4.0, 6.0, 3.0], "minmax") == pytest.approx([0.0, 0.5, 1.0, 0.25])


@pytest.mark.parametrize("scores", [[3.0, 3.0, 3.0], [0.1, 0.1, 0.1], [0.0, 0.0], [-7.0]])
def test_minmax_of_equal_scores_is_one(scores: list[float]) -> None:
    assert normalize_scores(scores, "minmax") == [1.0] * len(scores)
    assert minmax_first_stage(scores) == [1.0] * len(scores)


def test_zscore_uses_population_std() -> None:
    # mean 2, population std sqrt(((1-2)^2 + 0 + (3-2)^2) / 3) = sqrt(2/3)
    std = math.sqrt(2 / 3)
    assert normalize_scores([1.0, 2.0, 3.0], "zscore") == pytest.approx([-1 / std, 0.0, 1 / std])


@pytest.mark.parametrize("scores", [[3.0, 3.0, 3.0], [0.1, 0.1, 0.1], [0.0, 0.0], [-7.0]])
def test_zscore_of_equal_scores_is_zero(scores: list[float]) -> None:
    assert normalize_scores(scores, "zscore") == [0.0] * len(scores)


def test_huge_finite_scores_do_not_overflow() -> None:
    assert normalize_scores([1e308, -1e308], "minmax") == [1.0, 0.0]
    assert normalize_scores([1e308, -1e308], "zscore") == pytest.approx([1.0, -1.0])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_scores_raise_naming_the_index(method: Normalization, bad: float) -> None:
    with pytest.raises(ValueError, match="index 2"):
        normalize_scores([0.5, 1.0, bad, math.nan], method)


@pytest.mark.parametrize("method", METHODS)
def test_empty_input_gives_empty_output(method: Normalization) -> None:
    assert normalize_scores([], method) == []


def test_unknown_method_is_rejected() -> None:
    with pytest.raises(ValueError, match="softmax"):
        normalize_scores([1.0], "softmax")  # type: ignore[arg-type]


def test_minmax_first_stage_normalizes_within_the_set() -> None:
    # (x - 10) / (20 - 10)
    assert minmax_first_stage([10.0, 20.0, 15.0]) == pytest.approx([0.0, 1.0, 0.5])
    assert minmax_first_stage([]) == []
    with pytest.raises(ValueError, match="index 0"):
        minmax_first_stage([math.nan])


def test_blend_is_the_alpha_weighted_sum() -> None:
    # 0.25 * 0.8 + 0.75 * 0.4 = 0.5;  0.25 * 0.0 + 0.75 * 1.0 = 0.75
    assert blend([0.8, 0.0], [0.4, 1.0], alpha=0.25) == pytest.approx([0.5, 0.75])


def test_blend_alpha_one_is_pure_rerank_and_zero_pure_first_stage() -> None:
    rerank, first_stage = [0.3, 0.9, 0.1], [1.0, 0.0, 0.5]
    assert blend(rerank, first_stage, alpha=1.0) == rerank
    assert blend(rerank, first_stage, alpha=0.0) == first_stage


def test_blend_of_unit_interval_inputs_stays_in_it() -> None:
    rerank, first_stage = [0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]
    for alpha in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert all(0.0 <= s <= 1.0 for s in blend(rerank, first_stage, alpha))


@pytest.mark.parametrize("alpha", [-0.01, 1.01, math.nan])
def test_blend_rejects_alpha_outside_the_unit_interval(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        blend([0.5], [0.5], alpha)


def test_blend_requires_equal_lengths_and_finite_inputs() -> None:
    with pytest.raises(ValueError, match="2 rerank scores but 1"):
        blend([0.5, 0.5], [0.5], 0.5)
    with pytest.raises(ValueError, match="first-stage score at index 1"):
        blend([0.5, 0.5], [0.5, math.nan], 0.5)
    assert blend([], [], 0.5) == []


def test_rerank_order_sorts_by_blended_score_ties_in_first_stage_order() -> None:
    order = rerank_order([0.0, 2.0, 0.0], [1.0, 0.0, 0.5], "minmax", 1.0)
    assert [position for position, _ in order] == [1, 0, 2]
    blended = rerank_order([0.0, 2.0], [1.0, 0.0], "minmax", 0.25)
    assert blended == [(0, 0.75), (1, 0.25)]
