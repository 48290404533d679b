"""The learned final scorer's features and its serving.json: what serve computes per candidate,
and which files it accepts."""

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from sidecar.app import model_serving
from sidecar.config import Settings
from sidecar.rerank.final_scorer import (
    FEATURES,
    LearnedScorer,
    Serving,
    ServingFileError,
    Signals,
    feature_rows,
    read_serving,
    write_serving,
)

SIGNALS = [
    Signals(3.0, (1, 12.0), (2, 0.9), 99),
    Signals(2.0, None, (1, 0.95), 0),
    Signals(1.0, (2, float("nan")), None, 10),
]


def test_features_are_computed_over_the_request_as_serving_sees_it() -> None:
    rows = feature_rows(SIGNALS, [0, 2], [1.5, -0.5])
    named = [dict(zip(FEATURES, row, strict=True)) for row in rows]
    assert named[0]["rerank_logit_gap"] == 0.0
    assert named[1]["rerank_logit_gap"] == -2.0
    assert named[0]["first_stage_normalized"] == 1.0
    assert named[1]["first_stage_normalized"] == 0.0
    assert named[1]["first_stage_log_rank"] == pytest.approx(math.log(3))
    assert named[0]["lexical_score_ratio"] == 1.0
    # A non-finite BM25 score keeps its rank, not its score.
    assert named[1]["lexical_reciprocal_rank"] == 0.5
    assert named[1]["lexical_score_ratio"] == 0.0
    assert named[0]["vector_score_ratio"] == pytest.approx(0.9 / 0.95)
    assert named[1]["vector_reciprocal_rank"] == 0.0
    assert (named[0]["both_retrievers"], named[1]["both_retrievers"]) == (1.0, 0.0)
    assert named[0]["log_text_chars"] == pytest.approx(math.log(100))


def test_no_scored_candidates_give_no_rows() -> None:
    assert feature_rows(SIGNALS, [], []).shape == (0, len(FEATURES))


def scorer() -> LearnedScorer:
    coefficients = tuple(1.0 if name == "rerank_logit" else 0.0 for name in FEATURES)
    return LearnedScorer((0.0,) * len(FEATURES), (2.0,) * len(FEATURES), coefficients, 0.0)


def test_the_learned_score_is_a_probability_that_follows_its_coefficients() -> None:
    scores = scorer().score(feature_rows(SIGNALS, [0, 1, 2], [4.0, 0.0, -800.0]))
    assert scores[0] == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert scores[1] == 0.5
    assert 0.0 <= scores[2] < 1e-100


def test_serving_json_round_trips(tmp_path: Path) -> None:
    written = Serving(rerank_depth=50, final_scorer=scorer(), alpha=0.4)
    write_serving(tmp_path, written, {"queries": 3})
    assert read_serving(tmp_path) == written
    assert json.loads((tmp_path / "serving.json").read_text())["validation"] == {"queries": 3}


def test_whether_validation_gained_round_trips(tmp_path: Path) -> None:
    for gained in (True, False):
        written = Serving(rerank_depth=20, final_scorer=None, alpha=0.5, gained=gained)
        write_serving(tmp_path, written, {})
        assert read_serving(tmp_path) == written


def test_serve_warns_of_and_reports_a_model_that_gained_nothing_on_validation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings.from_env({"SIDECAR_RERANKER_MODEL": str(tmp_path)})
    for gained, warned in ((True, False), (None, False), (False, True)):
        write_serving(tmp_path, Serving(20, None, 0.5, gained=gained), {})
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sidecar.app"):
            served = model_serving(settings)
        assert served.settings.rerank_depth == 20
        assert served.validation == {True: "gained", False: "no_gain", None: "unrecorded"}[gained]
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert bool(warnings) is warned, gained
        if warned:
            assert "showed no gain" in warnings[0].getMessage()


def test_serve_blends_at_the_recorded_weight_unless_sidecar_alpha_is_set(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    plain = {"SIDECAR_RERANKER_MODEL": str(model)}
    assert model_serving(Settings.from_env(plain)).settings.blend_alpha() == 1.0, "no record"
    write_serving(model, Serving(20, None, 0.4), {})
    assert model_serving(Settings.from_env(plain)).settings.blend_alpha() == 0.4
    chosen = Settings.from_env({**plain, "SIDECAR_ALPHA": "0.7"})
    assert model_serving(chosen).settings.blend_alpha() == 0.7, "the operator's weight wins"


def test_a_model_without_serving_json_has_no_serving_choices(tmp_path: Path) -> None:
    assert read_serving(tmp_path) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 2}, "version 2"),
        ({"final_scorer": {"kind": "forest"}}, "unknown final scorer kind"),
        ({"final_scorer": {**scorer().to_json(), "features": ["rerank_logit"]}}, "features"),
        ({"final_scorer": {**scorer().to_json(), "scale": [0.0] * len(FEATURES)}}, "do not fit"),
        ({"alpha": None}, "serving.json"),
        ({"gained": "yes"}, "gained is 'yes'"),
    ],
)
def test_a_serving_file_this_sidecar_cannot_use_is_refused(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    write_serving(tmp_path, Serving(20, scorer(), 0.5), {})
    entry = json.loads((tmp_path / "serving.json").read_text())
    (tmp_path / "serving.json").write_text(json.dumps({**entry, **change}))
    with pytest.raises(ServingFileError, match=message):
        read_serving(tmp_path)


def test_rows_are_float64() -> None:
    assert feature_rows(SIGNALS, [0], [1.0]).dtype == np.float64
