"""The cross-encoder on every runtime and precision against torch fp32, on a model trained in the
test (an untrained head ranks by noise, so agreement on it would prove nothing): the same model
exported to ONNX, run by ONNX Runtime and OpenVINO, in fp32 and int8, cached on disk once."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from scipy.stats import spearmanr

from sidecar.config import DEFAULT_EMBEDDING_MODEL, Quantization, RerankRuntime
from sidecar.rerank.backend import CrossEncoderBackend, ScoringPair
from sidecar.training.data import build_examples, mine_negatives
from sidecar.training.fit import FitOptions, train_cross_encoder

pytestmark = pytest.mark.integration

TOPICS = {
    "volcano": "magma lava eruption crater ash vent tephra caldera",
    "bread": "dough yeast oven flour crust knead proof sourdough",
    "football": "goal striker referee offside pitch keeper penalty league",
    "vaccine": "antigen antibody immune dose booster pathogen memory cell",
    "glacier": "ice moraine crevasse meltwater snowfield fjord iceberg erosion",
    "violin": "bow string fiddle concerto rosin bridge scroll orchestra",
}
MAX_LENGTH = 64
# fp32 exports compute what torch computes, up to float rounding.
FP32_TOLERANCE = 1e-3
# int8 keeps the ranking: observed Spearman 0.97-0.99 on these pairs; the bound leaves margin.
INT8_MIN_SPEARMAN = 0.9
INT8_MIN_TOP10_OVERLAP = 7


def texts(rng: random.Random, topic: str, count: int) -> list[str]:
    words = TOPICS[topic].split()
    return [f"The {topic}: {' '.join(rng.choices(words, k=10))}." for _ in range(count)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MiniLM cross-encoder trained for a few steps to tell the topics apart."""
    rng = random.Random(5)
    documents = {f"{t}-{n}": text for t in TOPICS for n, text in enumerate(texts(rng, t, 4))}
    queries = {t: " ".join(rng.sample(TOPICS[t].split(), 3)) for t in TOPICS}
    qrels = {t: {f"{t}-0": 1, f"{t}-1": 1} for t in TOPICS}
    candidates = {t: [d for d in documents if not d.startswith(t)] for t in TOPICS}
    negatives = mine_negatives(candidates, qrels, per_query=6)
    train = build_examples(queries, documents, qrels, negatives)
    # Validation ranks first-stage candidates, which hold the relevant document: nDCG@10 then
    # moves as the model learns, and the best checkpoint kept is a trained one.
    validation = {
        t: (
            queries[t],
            [documents[f"{t}-0"]],
            [documents[f"{t}-0"]] + [documents[d] for d in candidates[t][:5]],
        )
        for t in list(TOPICS)[:2]
    }
    out = tmp_path_factory.mktemp("runtimes") / "trained"
    options = FitOptions(
        epochs=2, batch_size=8, max_length=MAX_LENGTH, device="cpu", progress=False
    )
    train_cross_encoder(DEFAULT_EMBEDDING_MODEL, train, validation, out, options)
    return out


@pytest.fixture(scope="module")
def pairs() -> list[ScoringPair]:
    """Every topic's query against documents of all topics: held out from training (new seed)."""
    rng = random.Random(11)
    out = []
    for topic in TOPICS:
        query = " ".join(rng.sample(TOPICS[topic].split(), 3))
        out += [ScoringPair(query, text, MAX_LENGTH) for t in TOPICS for text in texts(rng, t, 2)]
    return out


@pytest.fixture(scope="module")
def reference(trained: Path, pairs: list[ScoringPair]) -> list[float]:
    torch_fp32 = CrossEncoderBackend(
        str(trained), device="cpu", dtype="float32", max_length=MAX_LENGTH, runtime="torch"
    )
    return torch_fp32.score(pairs)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export-cache")


def backend(
    trained: Path,
    runtime: RerankRuntime,
    quantization: Quantization,
    cache_dir: Path,
    pairs: list[ScoringPair],
) -> CrossEncoderBackend:
    calibration = [(p.query, p.text) for p in pairs[::3]]
    return CrossEncoderBackend(
        str(trained),
        device="cpu",
        dtype="float32",
        max_length=MAX_LENGTH,
        runtime=runtime,
        quantization=quantization,
        calibration=calibration,
        cache_dir=cache_dir,
    )


def test_the_trained_model_tells_the_topics_apart(
    reference: list[float], pairs: list[ScoringPair]
) -> None:
    """The ranking under test means something: most queries' best document is of their topic
    (chance would be one in six)."""
    best: dict[str, tuple[float, str]] = {}
    for score, pair in zip(reference, pairs, strict=True):
        best[pair.query] = max(best.get(pair.query, (score, pair.text)), (score, pair.text))
    topic_of = {word: topic for topic, words in TOPICS.items() for word in words.split()}
    right = [text.startswith(f"The {topic_of[q.split()[0]]}:") for q, (_, text) in best.items()]
    assert sum(right) > len(TOPICS) // 2


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_fp32_exports_score_as_torch_does(
    trained: Path,
    runtime: RerankRuntime,
    cache_dir: Path,
    pairs: list[ScoringPair],
    reference: list[float],
) -> None:
    scores = backend(trained, runtime, "none", cache_dir, pairs).score(pairs)
    assert scores == pytest.approx(reference, abs=FP32_TOLERANCE)


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
@pytest.mark.parametrize("quantization", ["dynamic", "static"])
def test_int8_keeps_the_fp32_ranking(
    trained: Path,
    runtime: RerankRuntime,
    quantization: Quantization,
    cache_dir: Path,
    pairs: list[ScoringPair],
    reference: list[float],
) -> None:
    int8 = backend(trained, runtime, quantization, cache_dir, pairs)
    assert int8.dtype == "int8"
    scores = int8.score(pairs)
    rho = spearmanr(reference, scores).statistic
    top = set(sorted(range(len(pairs)), key=lambda i: -reference[i])[:10])
    top_int8 = set(sorted(range(len(pairs)), key=lambda i: -scores[i])[:10])
    print(
        f"{runtime} int8 {quantization}: Spearman {rho:.4f}, top-10 overlap {len(top & top_int8)}"
    )
    assert rho >= INT8_MIN_SPEARMAN
    assert len(top & top_int8) >= INT8_MIN_TOP10_OVERLAP


def test_an_export_is_made_once_and_reused(
    trained: Path, cache_dir: Path, pairs: list[ScoringPair]
) -> None:
    backend(trained, "onnx", "dynamic", cache_dir, pairs)
    exports = sorted(cache_dir.glob("rerankers/*/model.onnx"))
    stamps = [path.stat().st_mtime_ns for path in exports]
    backend(trained, "onnx", "dynamic", cache_dir, pairs)
    assert sorted(cache_dir.glob("rerankers/*/model.onnx")) == exports
    assert [path.stat().st_mtime_ns for path in exports] == stamps, "not rebuilt"
    assert not list(cache_dir.glob("rerankers/.export-*")), "no work folder left behind"


def test_runtime_and_precision_are_part_of_the_cache_identity(
    trained: Path, cache_dir: Path, pairs: list[ScoringPair]
) -> None:
    identities = {
        backend(trained, runtime, quantization, cache_dir, pairs).identity
        for runtime, quantization in [("torch", "none"), ("onnx", "none"), ("onnx", "dynamic")]
    }
    assert len(identities) == 3


def test_int8_on_torch_is_refused(trained: Path, cache_dir: Path, pairs: list[ScoringPair]) -> None:
    with pytest.raises(ValueError, match="needs the onnx or openvino backend"):
        backend(trained, "torch", "dynamic", cache_dir, pairs)
