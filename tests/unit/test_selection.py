"""Choosing how a trained reranker is served, on validation queries: blend weight, the learned
final scorer (fitted out of fold), the rerank depth; and the pseudo-queries made from a corpus."""

import json
import random
from pathlib import Path

from sidecar.indexing.corpus import Document
from sidecar.rerank.final_scorer import Signals
from sidecar.training.data import pseudo_examples, pseudo_queries
from sidecar.training.selection import (
    ScoredQuery,
    choose_alpha,
    choose_serving,
    final_run,
    fit_learned_scorer,
    surer_scorer,
)


def validation_set(relevant_at: int, queries: int = 30, seed: int = 1) -> tuple[dict, dict]:
    """`queries` queries of 100 candidates, the relevant one at first-stage position
    `relevant_at`, which the reranker scores far above the rest."""
    rng = random.Random(seed)
    scored, qrels = {}, {}
    for number in range(queries):
        ids = [f"q{number}-d{position}" for position in range(100)]
        fused = [1.0 - position / 100 for position in range(100)]
        signals = [
            Signals(score, (position + 1, 10 * score), None, 200)
            for position, score in enumerate(fused)
        ]
        logits = [rng.gauss(0.0, 1.0) for _ in ids]
        logits[relevant_at] = 8.0
        scored[f"q{number}"] = ScoredQuery(ids, signals, logits)
        qrels[f"q{number}"] = {ids[relevant_at]: 1}
    return scored, qrels


def test_the_recorded_depth_is_the_shallowest_that_reaches_the_relevant_documents() -> None:
    scored, qrels = validation_set(relevant_at=30)
    serving, figures = choose_serving(scored, qrels, "sigmoid", [20, 50, 100], seed=3)
    assert figures["depths"]["20"]["blend"]["gain"]["mean"] == 0.0, "depth 20 never sees it"
    for name in ("blend", "learned"):
        assert figures["depths"]["50"][name]["ndcg10"] == 1.0
        assert figures["depths"]["100"][name]["ndcg10"] == 1.0
    assert figures["positive_depths"] == [50, 100]
    assert serving.rerank_depth == 50
    assert figures["first_stage_ndcg10"] == 0.0


def test_a_mean_gain_whose_interval_spans_zero_is_no_gain_shown() -> None:
    helped, helped_qrels = validation_set(relevant_at=30, queries=2)
    unchanged, unchanged_qrels = validation_set(relevant_at=0, queries=10, seed=2)
    scored = helped | {f"u{q}": query for q, query in unchanged.items()}
    qrels = helped_qrels | {f"u{q}": judged for q, judged in unchanged_qrels.items()}
    serving, figures = choose_serving(scored, qrels, "sigmoid", [20, 50, 100], seed=3)
    chosen = figures["depths"]["100"][figures["final_scorer"]]["gain"]
    assert chosen["mean"] > 0, "two queries of twelve gain, none loses"
    assert chosen["ci95"][0] <= 0
    assert figures["positive_depths"] == []
    assert serving.gained is False
    assert serving.rerank_depth == 20


def test_no_gain_at_any_depth_records_the_shallowest_depth() -> None:
    scored, qrels = validation_set(relevant_at=0)
    serving, figures = choose_serving(scored, qrels, "sigmoid", [20, 50, 100], seed=3)
    assert figures["first_stage_ndcg10"] == 1.0
    assert serving.rerank_depth == 20, "not every candidate: the least cost where nothing gains"
    assert serving.gained is False
    assert figures["positive_depths"] == []


def test_the_blend_is_judged_on_queries_its_weight_was_not_chosen_on() -> None:
    # A weak reranker (its relevant documents +2.5 over unit noise): the weight chosen on all the
    # queries also fits their noise, so judged on those same queries the blend looks better than
    # on queries it was not chosen on, as the figures judge it.
    rng = random.Random(0)
    scored, qrels = {}, {}
    for number in range(20):
        ids = [f"q{number}-d{p}" for p in range(100)]
        signals = [Signals(1.0 - p / 100, (p + 1, 5.0), None, 100) for p in range(100)]
        relevant = rng.sample(range(30), 2)
        logits = [rng.gauss(0.0, 1.0) for _ in ids]
        for position in relevant:
            logits[position] += 2.5
        scored[f"q{number}"] = ScoredQuery(ids, signals, logits)
        qrels[f"q{number}"] = {ids[p]: 1 for p in relevant}
    serving, figures = choose_serving(scored, qrels, "sigmoid", [20, 50, 100], seed=0)
    in_sample = choose_alpha(scored, qrels, "sigmoid", 100)
    assert serving.alpha == in_sample.alpha, "the weight served is chosen on every query"
    judged = figures["depths"]["100"]["blend"]["ndcg10"]
    assert figures["first_stage_ndcg10"] < judged < in_sample.ndcg10


def test_judgments_of_other_queries_do_not_count_as_misses() -> None:
    # The recipe passes the whole judgments file: training and held-out queries are judged too,
    # but only the validation queries were scored, and only they may be averaged.
    scored, qrels = validation_set(relevant_at=0)
    qrels |= {f"train{number}": {f"train{number}-d0": 1} for number in range(90)}
    _, figures = choose_serving(scored, qrels, "sigmoid", [20, 50, 100], seed=3)
    assert figures["first_stage_ndcg10"] == 1.0
    assert figures["depths"]["100"]["blend"]["ndcg10"] == 1.0
    assert figures["depths"]["100"]["learned"]["gain"]["ties"] == len(scored)


def test_the_learned_scorer_learns_where_the_reranker_is_wrong() -> None:
    # The reranker overrates what only the vector retriever found (+3), which is never
    # relevant here; the learned scorer sees which retriever found a candidate, the blend not.
    rng = random.Random(5)
    scored, qrels = {}, {}
    for number in range(60):
        ids = [f"q{number}-d{p}" for p in range(100)]
        relevant = rng.randrange(0, 40, 2)
        signals = [
            Signals(1.0 - p / 100, (p + 1, 5.0) if p % 2 == 0 else None, (p + 1, 0.5), 100)
            for p in range(100)
        ]
        logits = [rng.gauss(0.0, 1.0) + (3.0 if p % 2 else 0.0) for p in range(100)]
        logits[relevant] += 3.0
        scored[f"q{number}"] = ScoredQuery(ids, signals, logits)
        qrels[f"q{number}"] = {ids[relevant]: 1}
    fit = fit_learned_scorer(scored, qrels, [100], seed=0)
    assert set(fit.out_of_fold[100]) == set(scored), "every query judged out of fold"
    serving, figures = choose_serving(scored, qrels, "sigmoid", [20, 50, 100], seed=0)
    deepest = figures["depths"]["100"]
    assert deepest["learned"]["ndcg10"] > deepest["blend"]["ndcg10"]
    assert figures["final_scorer"] == "learned"
    assert serving.final_scorer is not None
    assert json.dumps(figures), "the figures go into serving.json"


def test_the_scorer_served_is_the_one_whose_gain_is_surer() -> None:
    def entry(blend: tuple[float, float], learned: tuple[float, float]) -> dict:
        return {
            name: {"gain": {"mean": (low + high) / 2, "ci95": [low, high]}}
            for name, (low, high) in {"blend": blend, "learned": learned}.items()
        }

    # The blend's larger mean rests on a wider interval that reaches below zero.
    assert surer_scorer(entry(blend=(-0.002, 0.057), learned=(0.0003, 0.032))) == "learned"
    assert surer_scorer(entry(blend=(0.03, 0.08), learned=(0.01, 0.09))) == "blend"
    assert surer_scorer(entry(blend=(0.01, 0.02), learned=(0.01, 0.05))) == "blend", "a tie"


def test_the_final_run_keeps_candidates_past_the_depth_in_first_stage_order() -> None:
    scored, _ = validation_set(relevant_at=5, queries=1)
    run = final_run(scored, 3, lambda _, query, depth: [0.0, 1.0, 2.0][:depth])
    order = sorted(run["q0"], key=run["q0"].__getitem__, reverse=True)
    assert order[:4] == ["q0-d2", "q0-d1", "q0-d0", "q0-d3"]


def write_corpus(path: Path, documents: list[Document]) -> Path:
    path.write_text(
        "".join(
            json.dumps({"_id": d.id, "title": d.title, "text": d.text}) + "\n" for d in documents
        )
    )
    return path


def test_pseudo_queries_are_titles_or_first_sentences_drawn_by_seed(tmp_path: Path) -> None:
    corpus = write_corpus(
        tmp_path / "corpus.jsonl",
        [
            Document("t", "Lava flows of basalt", "Basalt lava flows cool into columns of rock."),
            Document("s", "", "Sourdough needs a starter. It ferments flour and water for days."),
            Document("short", "Ice", "Glaciers move slowly down valleys."),
            Document("one", "", "A single sentence without any second part at all"),
        ],
    )
    made, documents = pseudo_queries(corpus, 10, seed=2)
    by_id = {entry.doc_id: entry for entry in made}
    assert set(by_id) == {"t", "s"}, "too short a title, or no rest, teaches nothing"
    assert (by_id["t"].query, by_id["t"].method) == ("Lava flows of basalt", "title")
    assert by_id["s"].query == "Sourdough needs a starter."
    assert by_id["s"].positive == "It ferments flour and water for days."
    assert by_id["s"].method == "first_sentence"
    assert pseudo_queries(corpus, 10, seed=2)[0] == made
    assert len(pseudo_queries(corpus, 1, seed=2)[0]) == 1
    assert set(documents) == {"t", "s", "short", "one"}


def test_pseudo_examples_never_use_the_source_as_a_negative_nor_show_titles(tmp_path: Path) -> None:
    corpus = write_corpus(
        tmp_path / "corpus.jsonl",
        [
            Document("t", "Lava flows of basalt", "Basalt lava flows cool into columns of rock."),
            Document("n1", "Ash clouds", "Volcanic ash travels far."),
            Document("n2", "Crater lakes", "Craters fill with rain."),
        ],
    )
    made, documents = pseudo_queries(corpus, 3, seed=0)
    assert [entry.doc_id for entry in made] == ["t"], "two-word titles are skipped"
    examples = pseudo_examples(made, {"t": ["t", "n1", "n2"]}, documents, negatives=1)
    assert examples == [
        ("Lava flows of basalt", "Basalt lava flows cool into columns of rock.", 1.0),
        ("Lava flows of basalt", "Volcanic ash travels far.", 0.0),
    ]


def test_no_pseudo_queries_when_none_are_asked_for(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "c.jsonl", [Document("t", "Lava flows of basalt", "a b c d")])
    assert pseudo_queries(corpus, 0, seed=0)[0] == []
