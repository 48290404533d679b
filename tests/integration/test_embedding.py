"""The real bi-encoder: reduced precision must not change what it retrieves."""

from pathlib import Path

import numpy as np
import pytest

from sidecar.config import DEFAULT_EMBEDDING_MODEL
from sidecar.embedding import BiEncoder, declared_dimension, resolve_model_source
from tests.integration.test_indexing import DOCUMENTS

QUERIES = [
    "hot molten rock",
    "bread fermentation",
    "storm on a gas planet",
    "paying the government",
]


@pytest.fixture(scope="module")
def full_precision() -> BiEncoder:
    return BiEncoder(DEFAULT_EMBEDDING_MODEL, device="cpu", dtype="float32")


@pytest.mark.parametrize("dtype", ["bfloat16", "auto"])
def test_reduced_precision_keeps_vectors_and_neighbours(
    full_precision: BiEncoder, dtype: str
) -> None:
    reduced = BiEncoder(DEFAULT_EMBEDDING_MODEL, device="cpu", dtype=dtype)
    texts = [f"{title} {text}" for _, title, text in DOCUMENTS]
    exact = np.asarray(full_precision.embed(texts))
    approx = np.asarray(reduced.embed(texts))
    assert np.allclose(np.linalg.norm(approx, axis=1), 1.0, atol=1e-3), "vectors stay unit length"
    assert float((exact * approx).sum(axis=1).min()) > 0.99
    for query in QUERIES:
        exact_ranking = np.argsort(-(exact @ np.asarray(full_precision.embed([query])[0])))
        approx_ranking = np.argsort(-(approx @ np.asarray(reduced.embed([query])[0])))
        assert exact_ranking[0] == approx_ranking[0], query


def test_dimension_and_device_are_reported(full_precision: BiEncoder) -> None:
    assert full_precision.dimension == 384
    assert full_precision.device == "cpu"
    assert len(full_precision.embed(["x"])[0]) == 384


def test_the_dimension_read_from_a_models_files_is_the_loaded_models(
    full_precision: BiEncoder, tmp_path: Path
) -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling

    assert declared_dimension(DEFAULT_EMBEDDING_MODEL) == full_precision.dimension
    transformer = SentenceTransformer(resolve_model_source(DEFAULT_EMBEDDING_MODEL), device="cpu")[
        0
    ]
    two_modes = Pooling(384, pooling_mode=("cls", "mean"))
    for name, modules in (
        ("pooled", [transformer, two_modes]),
        ("projected", [transformer, two_modes, Dense(768, 64), Normalize()]),
    ):
        SentenceTransformer(modules=modules, device="cpu").save(str(tmp_path / name))
        loaded = SentenceTransformer(str(tmp_path / name), device="cpu").get_embedding_dimension()
        assert declared_dimension(str(tmp_path / name)) == loaded, name
    assert declared_dimension("an/absent-hub-model") is None
