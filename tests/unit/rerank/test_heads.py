"""The fresh relevance heads on the bundled all-MiniLM-L6-v2 encoder: the segment-cosine head
ranks before training, calibrates to labels, and saves, loads and serves as a cross-encoder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sidecar.config import DEFAULT_EMBEDDING_MODEL
from sidecar.embedding import resolve_model_source
from sidecar.rerank.backend import CrossEncoderBackend, ScoringPair
from sidecar.rerank.heads import (
    SegmentCosine,
    calibrate_head,
    cross_encoder_from_encoder,
    load_saved_cross_encoder,
)
from sidecar.training.fit import FitOptions
from sidecar.training.recipe import TrainOptions, check_start

ENCODER = resolve_model_source(DEFAULT_EMBEDDING_MODEL)
# (query, document, label): each query's first document answers it, its second does not.
PAIRS = [
    ("how do volcanoes erupt", "Magma rises through the crust and erupts as lava.", 1.0),
    ("how do volcanoes erupt", "The recipe needs two cups of flour and an egg.", 0.0),
    ("what causes tides", "The moon's gravity pulls the oceans, causing tides.", 1.0),
    ("what causes tides", "The league's final was played on Sunday evening.", 0.0),
    ("how do vaccines work", "Vaccines train the immune system to recognise a pathogen.", 1.0),
    ("how do vaccines work", "A guitar has six strings tuned in fourths.", 0.0),
]


def predict(model: object, pairs: list[tuple[str, str, float]]) -> np.ndarray:
    return model.predict(  # type: ignore[attr-defined, no-any-return]
        [(query, text) for query, text, _ in pairs],
        activation_fn=torch.nn.Identity(),
        convert_to_numpy=True,
        show_progress_bar=False,
    )


def test_the_segment_cosine_head_is_the_cosine_of_the_query_and_document_token_means() -> None:
    model = cross_encoder_from_encoder(ENCODER, head="segment-cosine")
    query, text, _ = PAIRS[0]

    score = predict(model, [PAIRS[0]])[0]

    features = model.tokenizer(query, text, return_tensors="pt")
    with torch.no_grad():
        states = model.transformers_model(**features).last_hidden_state[0]
    segments = features["token_type_ids"][0]
    expected = torch.nn.functional.cosine_similarity(
        states[segments == 0].mean(0), states[segments == 1].mean(0), dim=0
    )
    assert score == pytest.approx(float(expected), abs=1e-5)
    assert model.num_labels == 1


def test_the_segment_cosine_head_ranks_before_any_training() -> None:
    model = cross_encoder_from_encoder(ENCODER, head="segment-cosine")
    scores = predict(model, PAIRS)
    # Every query's answer above its unrelated document, with no training at all.
    assert all(scores[i] > scores[i + 1] for i in range(0, len(PAIRS), 2))


def test_calibration_spreads_the_logits_around_the_labels_log_odds() -> None:
    model = cross_encoder_from_encoder(ENCODER, head="segment-cosine")
    cosines = predict(model, PAIRS)

    assert calibrate_head(model, PAIRS[:5], seed=0)  # 3 positives of 5

    logits = predict(model, PAIRS[:5])
    assert logits.std() == pytest.approx(1.0, abs=1e-4)
    assert logits.mean() == pytest.approx(np.log(4 / 3), abs=1e-4), "(3 + 1) / (5 + 2) positive"
    assert np.argsort(predict(model, PAIRS)).tolist() == np.argsort(cosines).tolist()


def test_calibration_to_graded_labels_centres_on_their_mean_not_the_share_above_zero() -> None:
    model = cross_encoder_from_encoder(ENCODER, head="segment-cosine")
    graded = [(query, text, label / 4) for query, text, label in PAIRS[:5]]  # 0.75 in all

    calibrate_head(model, graded, seed=0)

    expected = (0.75 + 1) / (5 + 2)
    assert predict(model, graded).mean() == pytest.approx(
        np.log(expected / (1 - expected)), abs=1e-4
    )


def test_calibration_keeps_the_cosines_order_whatever_the_labels_say() -> None:
    model = cross_encoder_from_encoder(ENCODER, head="segment-cosine")
    flipped = [(query, text, 1.0 - label) for query, text, label in PAIRS]

    calibrate_head(model, flipped, seed=0)

    assert model[-1].scale.item() > 0
    scores = predict(model, PAIRS)
    assert all(scores[i] > scores[i + 1] for i in range(0, len(PAIRS), 2))


def test_calibration_leaves_other_heads_alone() -> None:
    linear = cross_encoder_from_encoder(ENCODER, head="mean-linear")
    before = predict(linear, PAIRS)
    assert not calibrate_head(linear, PAIRS, seed=0)
    assert predict(linear, PAIRS) == pytest.approx(before)


def test_a_saved_segment_cosine_model_loads_and_serves_with_its_weights(tmp_path: Path) -> None:
    model = cross_encoder_from_encoder(ENCODER, head="segment-cosine")
    calibrate_head(model, PAIRS, seed=0)
    expected = predict(model, PAIRS)
    model.save_pretrained(str(tmp_path / "model"))

    loaded = load_saved_cross_encoder(str(tmp_path / "model"), device="cpu")
    assert isinstance(loaded[-1], SegmentCosine)
    assert predict(loaded, PAIRS) == pytest.approx(expected, abs=1e-5)

    backend = CrossEncoderBackend(str(tmp_path / "model"), device="cpu", dtype="float32")
    served = backend.score([ScoringPair(query, text, 32) for query, text, _ in PAIRS])
    assert served == pytest.approx(expected.tolist(), abs=1e-4)


def test_segment_cosine_needs_segment_ids(tmp_path: Path) -> None:
    encoder = tmp_path / "no-segments"
    shutil.copytree(ENCODER, encoder)
    config = json.loads((encoder / "tokenizer_config.json").read_text())
    config["model_input_names"] = ["input_ids", "attention_mask"]
    (encoder / "tokenizer_config.json").write_text(json.dumps(config))

    with pytest.raises(ValueError, match="no segment ids"):
        cross_encoder_from_encoder(str(encoder), head="segment-cosine")
    assert cross_encoder_from_encoder(str(encoder), head="mean-linear").num_labels == 1
    # train-reranker refuses it up front, before any index load or mining.
    with pytest.raises(ValueError, match="no segment ids"):
        check_start(str(encoder), TrainOptions())
    check_start(str(encoder), TrainOptions(fit=FitOptions(head="mean-linear")))


def test_a_module_class_outside_the_library_and_the_sidecar_stays_refused(tmp_path: Path) -> None:
    model = cross_encoder_from_encoder(ENCODER, head="segment-cosine")
    model.save_pretrained(str(tmp_path / "model"))
    modules_file = tmp_path / "model" / "modules.json"
    modules = json.loads(modules_file.read_text())
    # An importable class that is neither sentence-transformers' nor the sidecar's head.
    modules[-1]["type"] = "tests.unit.rerank.test_heads.LookAlike"
    modules_file.write_text(json.dumps(modules))

    with pytest.raises(ValueError, match="trust_remote_code"):
        load_saved_cross_encoder(str(tmp_path / "model"), device="cpu")


class LookAlike(SegmentCosine):
    """Would load and run if the loader trusted any importable class."""
