"""Training data preparation (split, negatives, pairs, distillation triples and targets), cutting a
model to a student's depth, and one tiny real fine-tuning run on CPU."""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sidecar.config import DEFAULT_EMBEDDING_MODEL
from sidecar.embedding import resolve_model_source
from sidecar.evaluation import read_qrels
from sidecar.rerank.backend import (
    CrossEncoderBackend,
    ScoringPair,
    build_untrained_cross_encoder,
    has_relevance_head,
)
from sidecar.rerank.final_scorer import Signals
from sidecar.training import DEFAULT_FOLDS, FEW_VALIDATION_QUERIES
from sidecar.training.card import write_model_card
from sidecar.training.cross_fit import default_folds
from sidecar.training.data import (
    Example,
    NegativeSampling,
    ValidationQuery,
    build_examples,
    build_triples,
    mine_negatives,
    query_folds,
    read_documents,
    split_queries,
    write_qrels,
)
from sidecar.training.fit import (
    Distillation,
    FitOptions,
    TrainingReport,
    check_layers,
    is_cross_encoder,
    score_margins,
    train_cross_encoder,
    truncate_layers,
)
from sidecar.training.recipe import TrainOptions, train_reranker
from sidecar.training.selection import ScoredQuery, choose_alpha


def test_split_is_deterministic_disjoint_and_complete() -> None:
    ids = [f"q{i}" for i in range(50)]
    train, validation = split_queries(ids, validation_share=0.2, seed=13)
    assert (train, validation) == split_queries(list(reversed(ids)), validation_share=0.2, seed=13)
    assert not set(train) & set(validation)
    assert set(train) | set(validation) == set(ids)
    assert len(validation) == 10
    assert split_queries(ids, validation_share=0.2, seed=14) != (train, validation)


def test_folds_deal_every_query_once_whatever_the_input_order() -> None:
    ids = [f"q{n}" for n in range(11)]
    folds = query_folds(ids, 3, seed=5)
    assert sorted(len(fold) for fold in folds) == [3, 4, 4]
    assert sorted(q for fold in folds for q in fold) == sorted(ids)
    assert query_folds(list(reversed(ids)), 3, seed=5) == folds
    assert query_folds(ids, 3, seed=6) != folds
    assert len(query_folds(ids[:2], 3)) == 2, "no empty fold"


def test_split_keeps_both_parts_non_empty() -> None:
    train, validation = split_queries(["a", "b"], validation_share=0.1)
    assert len(train) == len(validation) == 1


@pytest.mark.parametrize("share", [0.0, 1.0, -0.5])
def test_split_rejects_shares_outside_the_open_interval(share: float) -> None:
    with pytest.raises(ValueError, match="validation_share"):
        split_queries(["a", "b"], validation_share=share)


QRELS = {
    "q1": {"d1": 2, "d2": 1, "d3": 0},
    "q2": {"d5": 1},
    "q3": {"d7": 1, "d8": 1},
}
CANDIDATES = {
    "q1": ["d1", "d3", "d4", "d2", "d6", "d9"],
    "q2": ["d5", "d5", "d6", "d4"],
    "q3": ["d8", "d7"],  # every candidate is relevant
    "q4": ["d1", "d2"],  # no judgments at all
}


@pytest.mark.parametrize("sampling", ["top", "spread"])
@pytest.mark.parametrize("per_query", [0, 1, 2, 3, 10])
def test_negatives_are_never_judged_relevant_and_keep_rank_order(
    per_query: int, sampling: NegativeSampling
) -> None:
    negatives = mine_negatives(CANDIDATES, QRELS, per_query, sampling)
    assert set(negatives) == set(CANDIDATES)
    for query_id, chosen in negatives.items():
        judged = QRELS.get(query_id, {})
        assert all(judged.get(doc, 0) <= 0 for doc in chosen)
        assert len(chosen) <= per_query
        assert len(set(chosen)) == len(chosen)
        positions = [CANDIDATES[query_id].index(doc) for doc in chosen]
        assert positions == sorted(positions)


def test_negatives_take_the_top_unjudged_or_zero_judged_candidates() -> None:
    negatives = mine_negatives(CANDIDATES, QRELS, per_query=2)
    assert negatives == {"q1": ["d3", "d4"], "q2": ["d6", "d4"], "q3": [], "q4": ["d1", "d2"]}


def test_spread_negatives_are_a_seeded_sample_over_the_whole_depth() -> None:
    ranked = {f"q{i}": [f"d{rank}" for rank in range(100)] for i in range(20)}
    qrels = {query: {"d0": 1, "d50": 2} for query in ranked}
    negatives = mine_negatives(ranked, qrels, 4, "spread", seed=13)
    assert negatives == mine_negatives(ranked, qrels, 4, "spread", seed=13)
    assert negatives != mine_negatives(ranked, qrels, 4, "spread", seed=14)
    ranks = [int(doc[1:]) for chosen in negatives.values() for doc in chosen]
    assert len(ranks) == 80
    assert not {0, 50} & set(ranks)
    # Drawn over the whole list: the top four alone would never reach rank 5.
    assert sum(rank >= 50 for rank in ranks) >= 20
    # Queries draw apart, and fewer candidates than asked gives them all.
    assert len({tuple(chosen) for chosen in negatives.values()}) > 1
    assert mine_negatives(CANDIDATES, QRELS, 10, "spread") == mine_negatives(CANDIDATES, QRELS, 10)


def test_negatives_reject_a_negative_count() -> None:
    with pytest.raises(ValueError, match="per_query"):
        mine_negatives(CANDIDATES, QRELS, per_query=-1)


def test_examples_label_relevant_one_and_negatives_zero() -> None:
    queries = {"q1": "first", "q2": "second", "q9": "unjudged"}
    documents = {f"d{i}": f"text {i}" for i in range(1, 9)}
    negatives = {"q1": ["d3", "d4"], "q2": ["d6"], "q9": ["d1"]}
    examples = build_examples(queries, documents, QRELS, negatives)
    assert examples == [
        ("first", "text 1", 1.0),
        ("first", "text 2", 1.0),
        ("first", "text 3", 0.0),
        ("first", "text 4", 0.0),
        ("second", "text 5", 1.0),
        ("second", "text 6", 0.0),
    ]


def test_graded_examples_label_each_relevant_document_its_grade_over_the_highest() -> None:
    queries = {"q1": "first", "q2": "second"}
    documents = {f"d{i}": f"text {i}" for i in range(1, 9)}
    negatives = {"q1": ["d3"], "q2": ["d6"]}
    graded = build_examples(queries, documents, QRELS, negatives, labels="graded")
    assert graded == [
        ("first", "text 1", 1.0),
        ("first", "text 2", 0.5),
        ("first", "text 3", 0.0),
        ("second", "text 5", 0.5),
        ("second", "text 6", 0.0),
    ]
    # The scale is the highest grade among the queries given: alone, q2's grade 1 is the top.
    assert build_examples({"q2": "second"}, documents, QRELS, negatives, labels="graded") == [
        ("second", "text 5", 1.0),
        ("second", "text 6", 0.0),
    ]
    assert [label for *_, label in build_examples(queries, documents, QRELS, negatives)] == [
        1.0,
        1.0,
        0.0,
        1.0,
        0.0,
    ]


def test_examples_refuse_a_relevant_negative() -> None:
    with pytest.raises(ValueError, match="judged relevant"):
        build_examples({"q1": "first"}, {"d1": "one"}, QRELS, {"q1": ["d1"]})


def test_triples_pair_every_relevant_document_with_every_negative_in_order() -> None:
    queries = {"q1": "first", "q2": "second", "q9": "unjudged"}
    documents = {f"d{i}": f"text {i}" for i in range(1, 9)}
    negatives = {"q1": ["d3", "d4", "d404"], "q2": ["d6"], "q9": ["d1"]}
    triples = build_triples(queries, documents, QRELS, negatives)
    assert triples == [
        ("first", "text 1", "text 3"),
        ("first", "text 1", "text 4"),
        ("first", "text 2", "text 3"),
        ("first", "text 2", "text 4"),
        ("second", "text 5", "text 6"),
    ], "a missing document is skipped, a query without judgments contributes nothing"


def test_triples_refuse_a_relevant_negative() -> None:
    with pytest.raises(ValueError, match="judged relevant"):
        build_triples({"q1": "first"}, {"d1": "one", "d2": "two"}, QRELS, {"q1": ["d2"]})


class LengthTeacher:
    """Scores a pair by its document's length, and records what it was asked to score."""

    def __init__(self) -> None:
        self.scored: list[tuple[str, str]] = []

    def predict(self, pairs: list[tuple[str, str]], **options: Any) -> np.ndarray:
        self.scored.extend(pairs)
        return np.array([float(len(text)) for _, text in pairs], dtype=np.float32)


def test_margins_are_the_teachers_logit_differences_each_pair_scored_once() -> None:
    triples = [("q", "long positive", "neg"), ("q", "long positive", "negative"), ("r", "p", "neg")]
    teacher = LengthTeacher()
    margins, scored = score_margins(teacher, triples, batch_size=2, progress=False)
    assert margins == [10.0, 5.0, -2.0]
    assert scored == len(teacher.scored) == 5
    assert len(set(teacher.scored)) == 5


def tiny_bert_config(layers: int) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )


@pytest.mark.parametrize("head", ["bare encoder", "sequence classifier"])
def test_truncation_keeps_the_embeddings_the_first_layers_and_the_head(head: str) -> None:
    import torch
    from transformers import BertForSequenceClassification, BertModel

    config = tiny_bert_config(4)
    model = BertModel(config) if head == "bare encoder" else BertForSequenceClassification(config)
    kept = list(model.base_model.encoder.layer[:2])
    before = {name: value.clone() for name, value in model.state_dict().items()}

    assert truncate_layers(model, 2) == 4

    assert list(model.base_model.encoder.layer) == kept
    assert model.config.num_hidden_layers == 2
    after = model.state_dict()
    assert all(".layer.2." not in name and ".layer.3." not in name for name in after)
    assert set(after) == {
        name for name in before if ".layer.2." not in name and ".layer.3." not in name
    }
    assert all(torch.equal(after[name], before[name]) for name in after)
    model(input_ids=torch.tensor([[1, 2, 3]]))  # still runs end to end


@pytest.mark.parametrize("layers", [0, -1, 4, 5])
def test_truncation_refuses_keeping_none_or_all_of_the_layers(layers: int) -> None:
    from transformers import BertModel

    model = BertModel(tiny_bert_config(4))
    with pytest.raises(ValueError, match=r"layers must be in 1\.\.3"):
        truncate_layers(model, layers)
    assert len(model.encoder.layer) == 4, "a refused truncation leaves the model whole"


def test_truncation_refuses_architectures_that_are_not_bert_like() -> None:
    from transformers import DistilBertConfig, DistilBertModel

    config = DistilBertConfig(
        vocab_size=64, dim=16, n_layers=3, n_heads=2, hidden_dim=32, max_position_embeddings=32
    )
    with pytest.raises(ValueError, match="cannot truncate a DistilBertModel"):
        truncate_layers(DistilBertModel(config), 1)


def test_check_layers_accepts_exactly_the_depths_that_cut_something() -> None:
    for layers in (1, 5):
        check_layers(layers, 6)
    for layers in (0, 6, 7):
        with pytest.raises(ValueError, match="6-layer"):
            check_layers(layers, 6)


def test_a_truncated_cross_encoder_saves_and_loads_with_its_new_depth(tmp_path: Path) -> None:
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(build_untrained_cross_encoder(tmp_path / "stand-in")), device="cpu")
    truncate_layers(model.transformers_model, 2)
    pairs = [("how do volcanoes erupt", "Magma rises through the crust."), ("x", "y")]
    in_memory = model.predict(pairs, convert_to_numpy=True)
    model.save_pretrained(str(tmp_path / "student"))

    loaded = CrossEncoder(str(tmp_path / "student"), device="cpu")
    assert len(loaded.transformers_model.encoder.layer) == 2
    assert loaded.transformers_model.config.num_hidden_layers == 2
    assert loaded.predict(pairs, convert_to_numpy=True) == pytest.approx(in_memory, abs=1e-5)
    assert is_cross_encoder(str(tmp_path / "student")), "its dense head is kept, not replaced"
    assert not is_cross_encoder(resolve_model_source(DEFAULT_EMBEDDING_MODEL))


def test_few_validation_queries_cross_fit_by_default_where_the_schedule_allows() -> None:
    few = FEW_VALIDATION_QUERIES - 1
    assert default_folds(few, 180, FitOptions()) == DEFAULT_FOLDS
    assert default_folds(FEW_VALIDATION_QUERIES, 647, FitOptions()) == 0, "enough to choose by"
    assert default_folds(1, 3, FitOptions()) == 3, "at most one fold per query"
    assert default_folds(0, 1, FitOptions()) == 0, "one query cannot be cross-fitted"
    # A schedule that chooses checkpoints keeps the split rather than failing.
    assert default_folds(few, 180, FitOptions(epochs=3)) == 0
    assert default_folds(few, 180, FitOptions(early_stopping_patience=1)) == 0
    assert default_folds(few, 180, FitOptions(checkpoint_steps=50)) == 0


@pytest.mark.parametrize(
    ("options", "refusal"),
    [
        (TrainOptions(layers=6), r"layers must be in 1\.\.5"),
        (TrainOptions(teacher=DEFAULT_EMBEDDING_MODEL, layers=2), "not a cross-encoder"),
        (TrainOptions(teacher="any-cross-encoder"), "needs the student's depth"),
        (TrainOptions(cross_fit_folds=1), "at least 2 folds"),
        (TrainOptions(cross_fit_folds=3, fit=FitOptions(epochs=2)), "in sample"),
        (TrainOptions(cross_fit_folds=3, fit=FitOptions(checkpoint_steps=50)), "in sample"),
        (
            TrainOptions(cross_fit_folds=3, teacher="any-cross-encoder", layers=2),
            "distillation is not cross-fitted",
        ),
        (
            TrainOptions(teacher="any-cross-encoder", layers=2, labels="graded"),
            "no graded labels",
        ),
    ],
)
def test_train_reranker_refuses_a_bad_start_before_reading_or_mining(
    options: TrainOptions, refusal: str, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-dataset"
    with pytest.raises(ValueError, match=refusal):
        train_reranker(
            "http://127.0.0.1:9",  # nothing listens: mining would fail differently
            "index",
            missing,
            missing / "qrels.tsv",
            DEFAULT_EMBEDDING_MODEL,
            tmp_path / "out",
            options,
            "sidecar train-reranker",
        )
    assert not (tmp_path / "out").exists()


def test_a_distilled_models_card_sets_its_quality_and_speed_beside_the_teachers(
    tmp_path: Path,
) -> None:
    report = TrainingReport(
        base="teacher-model",
        out_dir=tmp_path,
        train_examples=54,
        train_queries=9,
        validation_queries=3,
        epochs=3,
        learning_rate=2e-5,
        layers=2,
        ndcg10_before=0.5,
        ndcg10_after=0.6,
        seconds=12.0,
        device="cpu",
        precision="fp32",
        model_bytes=1000,
        distillation=Distillation(
            teacher="teacher-model",
            teacher_layers=6,
            teacher_scored_pairs=45,
            teacher_ndcg10=0.7,
            teacher_pairs_per_s=50.0,
            student_pairs_per_s=125.0,
            throughput_pairs=24,
            throughput_batch_size=8,
            throughput_dtype="float32",
        ),
    )
    text = write_model_card(report, "sidecar train-reranker --teacher t", "toy").read_text()
    assert text.startswith("# Cross-encoder reranker distilled from teacher-model")
    assert "| teacher | `teacher-model`, 6 layers |" in text
    assert "| transformer layers | 2 (the teacher's first 2," in text
    assert "| training triples (query, relevant, negative) | 54 |" in text
    assert "| validation nDCG@10: teacher / student | 0.7000 / 0.6000 |" in text
    assert (
        "| pairs/s on the 24 validation pairs, batches of 8, cpu float32: teacher / student | "
        "50.0 / 125.0 (2.50x) |"
    ) in text
    assert "training pairs" not in text


TOPICS = {
    "t1": (
        "how do volcanoes erupt",
        [
            "Magma rises through the crust and erupts from a volcano as lava and ash.",
            "Volcanic eruptions happen when gas pressure in magma chambers forces molten rock up.",
        ],
    ),
    "t2": (
        "how to bake sourdough bread",
        [
            "Sourdough bread is leavened with a starter culture of wild yeast and baked in a hot oven.",
            "Feed the sourdough starter, knead the dough, let it proof overnight and bake it.",
        ],
    ),
    "t3": (
        "rules of association football",
        [
            "In football two teams of eleven players try to kick the ball into the opposing goal.",
            "A football match lasts ninety minutes and offside rules restrict attacking players.",
        ],
    ),
    "t4": (
        "how do vaccines train the immune system",
        [
            "Vaccines expose the immune system to an antigen so it produces antibodies.",
            "After vaccination memory cells let the immune system respond quickly to infection.",
        ],
    ),
    "t5": (
        "python list comprehension syntax",
        [
            "A Python list comprehension builds a list with brackets: [x * 2 for x in items].",
            "List comprehensions in Python can filter with an if clause after the for clause.",
        ],
    ),
    "t6": (
        "migration of monarch butterflies",
        [
            "Monarch butterflies migrate thousands of kilometres from Canada to Mexico each autumn.",
            "The monarch butterfly migration spans several generations of the insect.",
        ],
    ),
}


@dataclass(frozen=True)
class TinyTask:
    queries: dict[str, str]
    documents: dict[str, str]
    train: list[Example]
    validation: dict[str, ValidationQuery]
    train_ids: list[str]


@pytest.fixture(scope="module")
def tiny_task() -> TinyTask:
    ids = sorted(TOPICS)
    documents = {
        f"{topic}-{n}": text for topic in ids for n, text in enumerate(TOPICS[topic][1], start=1)
    }
    queries = {topic: TOPICS[topic][0] for topic in ids}
    qrels = {topic: {f"{topic}-1": 1, f"{topic}-2": 1} for topic in ids}
    # Every other topic's documents are candidates, as a first stage would return them.
    candidates = {topic: [doc for doc in documents if not doc.startswith(topic)] for topic in ids}
    train_ids, validation_ids = split_queries(ids, validation_share=0.34)
    negatives = mine_negatives(candidates, qrels, per_query=4)
    train = build_examples({q: queries[q] for q in train_ids}, documents, qrels, negatives)
    validation = {
        q: (
            queries[q],
            [documents[d] for d in qrels[q]],
            # A first stage's candidates hold relevant documents too; the evaluator ranks these.
            [documents[d] for d in qrels[q]] + [documents[d] for d in candidates[q][:6]],
        )
        for q in validation_ids
    }
    return TinyTask(queries, documents, train, validation, train_ids)


def train_tiny(task: TinyTask, out: Path, **options: Any) -> TrainingReport:
    return train_cross_encoder(
        DEFAULT_EMBEDDING_MODEL,
        task.train,
        task.validation,
        out,
        FitOptions(batch_size=8, max_length=64, device="cpu", progress=False, **options),
    )


def test_tiny_training_run_writes_a_loadable_reranker_and_a_card(
    tiny_task: TinyTask, tmp_path: Path
) -> None:
    out = tmp_path / "reranker"

    report = train_tiny(tiny_task, out)

    assert report.train_examples == len(tiny_task.train) == 4 * 6
    assert report.train_queries == len(tiny_task.train_ids) == 4
    assert report.validation_queries == 2
    assert 0.0 <= report.ndcg10_before <= 1.0
    assert 0.0 <= report.ndcg10_after <= 1.0
    assert report.device == "cpu"
    assert report.model_bytes > 1_000_000
    assert not (out / "checkpoints").exists(), "checkpoints are removed once the model is written"
    assert report.learning_rate == 1e-4, "a fresh head's default"
    assert report.head == "segment-cosine"
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "SegmentCosine"]

    backend = CrossEncoderBackend(str(out), device="cpu", dtype="float32")
    scores = backend.score(
        [
            ScoringPair(tiny_task.queries["t1"], tiny_task.documents["t1-1"], 32),
            ScoringPair("x", "y", 4),
        ]
    )
    assert len(scores) == 2
    assert all(isinstance(score, float) for score in scores)

    card = write_model_card(report, "sidecar train --epochs 1", "six hand-written topics")
    text = card.read_text()
    assert card == out / "README.md"
    assert DEFAULT_EMBEDDING_MODEL in text
    assert f"{report.ndcg10_before:.4f}" in text
    assert f"{report.ndcg10_after:.4f}" in text
    assert "six hand-written topics" in text
    assert "sidecar train --epochs 1" in text
    assert "| relevance head | new: cosine of the query's" in text


def test_an_interrupted_run_is_refused_unless_resumed_and_then_completes(
    tiny_task: TinyTask,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from sentence_transformers.cross_encoder import CrossEncoderTrainer

    save_checkpoint = CrossEncoderTrainer._save_checkpoint

    def save_then_interrupt(self: Any, *args: Any, **kwargs: Any) -> None:
        save_checkpoint(self, *args, **kwargs)
        raise KeyboardInterrupt  # as Ctrl-C right after the first checkpoint

    out = tmp_path / "reranker"
    with monkeypatch.context() as patch:
        patch.setattr(CrossEncoderTrainer, "_save_checkpoint", save_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            train_tiny(tiny_task, out, checkpoint_steps=1)
    assert [path.name for path in (out / "checkpoints").glob("checkpoint-*")] == ["checkpoint-1"]

    with pytest.raises(ValueError, match="interrupted run"):
        train_tiny(tiny_task, out, checkpoint_steps=1)

    with caplog.at_level(logging.INFO, logger="sidecar.training"):
        report = train_tiny(tiny_task, out, checkpoint_steps=1, resume=True)
    assert "resuming" in caplog.text
    assert not (out / "checkpoints").exists()
    assert 0.0 <= report.ndcg10_after <= 1.0
    assert CrossEncoderBackend(str(out), device="cpu", dtype="float32").score(
        [ScoringPair("x", "y", 4)]
    )


def test_the_base_decides_whether_a_head_is_added(tmp_path: Path) -> None:
    from sentence_transformers import CrossEncoder

    encoder = resolve_model_source(DEFAULT_EMBEDDING_MODEL)
    assert not has_relevance_head(encoder)
    CrossEncoder(encoder, num_labels=1, device="cpu").save_pretrained(str(tmp_path / "cls"))
    assert has_relevance_head(str(tmp_path / "cls"))
    assert has_relevance_head(str(build_untrained_cross_encoder(tmp_path / "stand-in"))) is False
    assert CrossEncoderBackend(str(tmp_path / "stand-in"), device="cpu").score(
        [ScoringPair("query", "document", 6)]
    )


def test_a_base_that_cannot_be_loaded_is_a_clear_error(tiny_task: TinyTask, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot load the model"):
        train_cross_encoder(
            str(tmp_path / "no-such-model"), tiny_task.train, tiny_task.validation, tmp_path / "out"
        )


def scored_query(ids: list[str], fused: list[float], logits: list[float]) -> ScoredQuery:
    """Candidates found by BM25 alone, in first-stage order, with 100-character texts."""
    signals = [Signals(score, (rank, score), None, 100) for rank, score in enumerate(fused, 1)]
    return ScoredQuery(ids, signals, logits)


def test_the_blend_weight_follows_the_reranker_when_it_is_right() -> None:
    # The first stage ranks the relevant "c" third; the reranker ranks it first.
    scored = {"q1": scored_query(["a", "b", "c"], [3.0, 2.0, 1.0], [0.0, 0.0, 5.0])}
    choice = choose_alpha(scored, {"q1": {"c": 1}}, "sigmoid", depth=3)
    assert choice.alpha == 1.0, "ties go to the larger weight"
    assert choice.reranker == choice.ndcg10 == 1.0
    assert choice.first_stage == pytest.approx(0.5)


def test_the_blend_weight_stays_with_the_first_stage_when_the_reranker_is_wrong() -> None:
    # Relevant "a" is first in the first stage, last for the reranker: a = 1 - 0.9933 alpha
    # beats b = 0.5 only while alpha < 0.503, so 0.5 is the largest weight that keeps it first.
    scored = {"q2": scored_query(["a", "b", "c"], [3.0, 2.0, 1.0], [-5.0, 0.0, 0.0])}
    choice = choose_alpha(scored, {"q2": {"a": 1}}, "sigmoid", depth=3)
    assert choice.alpha == 0.5
    assert choice.ndcg10 == choice.first_stage == 1.0
    assert choice.reranker < 1.0


def test_qrels_written_are_read_back(tmp_path: Path) -> None:
    path = tmp_path / "heldout.tsv"
    write_qrels(QRELS, path)
    assert read_qrels(path) == QRELS


def test_documents_are_read_as_the_rerank_stage_reads_them(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        '{"_id": "a", "title": "Title", "text": "body"}\n'
        '{"_id": "b", "title": "", "text": "only body"}\n'
        '{"_id": "c", "title": "unwanted", "text": "x"}\n'
    )
    documents = read_documents(corpus, {"a", "b", "missing"})
    assert documents == {
        "a": "Title body",
        "b": "only body",
    }
