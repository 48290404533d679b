"""`sidecar train-reranker` end to end: a generated collection loaded through the command, hard
negatives mined through the real sidecar's first stage, a real (tiny) fine-tuning, and the model
it writes served as the reranker and evaluated on the queries it held out."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.embedding import BiEncoder
from sidecar.evaluation import read_qrels, search
from sidecar.training import HELDOUT_QRELS, NEGATIVES_FILE, SPLITS_FILE
from tests.integration.conftest import Cluster
from tests.integration.sidecar_server import RunningSidecar, running_sidecar
from tests.integration.test_indexing import write_corpus

pytestmark = pytest.mark.integration

TOPIC_WORDS = {
    "volcano": "magma lava eruption crater ash vent tephra caldera",
    "bread": "dough yeast oven flour crust knead proof sourdough",
    "football": "goal striker referee offside pitch keeper penalty league",
    "vaccine": "antigen antibody immune dose booster pathogen memory cell",
    "python": "list comprehension function module import class generator loop",
    "butterfly": "monarch migration wing caterpillar nectar chrysalis milkweed larva",
    "glacier": "ice moraine crevasse meltwater snowfield fjord iceberg erosion",
    "violin": "bow string fiddle concerto rosin bridge scroll orchestra",
}
DOCS_PER_TOPIC = 5
CANDIDATES = 8
NEGATIVES = 3


def generate_collection(folder: Path, seed: int = 3) -> dict[str, dict[str, int]]:
    """A BEIR folder of seeded topic texts; returns its qrels. Per query the topic's first two
    documents are relevant, the third is judged not relevant, the rest are unjudged."""
    rng = random.Random(seed)
    documents, queries, qrels = [], {}, {}
    for topic, words in TOPIC_WORDS.items():
        vocabulary = words.split()
        for n in range(DOCS_PER_TOPIC):
            text = " ".join(rng.choices(vocabulary, k=12))
            documents.append((f"{topic}-{n}", f"{topic} {vocabulary[n]}", f"The {topic}: {text}."))
        for n in range(2):
            query_id = f"{topic}-q{n}"
            queries[query_id] = " ".join(rng.sample(vocabulary, 3))
            qrels[query_id] = {f"{topic}-0": 1, f"{topic}-1": 1, f"{topic}-2": 0}
    (folder / "qrels").mkdir(parents=True)
    write_corpus(folder / "corpus.jsonl", documents)
    (folder / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items())
    )
    (folder / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n"
        + "".join(f"{q}\t{d}\t{s}\n" for q, docs in qrels.items() for d, s in docs.items())
    )
    return qrels


def test_train_reranker_mines_trains_and_the_model_serves_and_evaluates(
    opensearch: Cluster, encoder: BiEncoder, tiny_sidecar: RunningSidecar, tmp_path: Path
) -> None:
    dataset, out, index = tmp_path / "generated", tmp_path / "reranker", "test-train-generated"
    qrels = generate_collection(dataset)
    queries = {
        entry["_id"]: entry["text"]
        for entry in map(json.loads, (dataset / "queries.jsonl").read_text().splitlines())
    }
    try:
        arguments = [
            "train-reranker",
            "--dataset",
            str(dataset),
            "--index",
            index,
            "--out",
            str(out),
            "--url",
            tiny_sidecar.url,
            "--opensearch",
            opensearch.url,
            "--holdout-share",
            "0.25",
            "--validation-share",
            "0.25",
            "--candidates",
            str(CANDIDATES),
            "--negatives",
            str(NEGATIVES),
            "--batch-size",
            "8",
            "--max-length",
            "64",
            "--device",
            "cpu",
        ]
        assert main(arguments) == 0
        assert opensearch.client.count(index=index)["count"] == len(TOPIC_WORDS) * DOCS_PER_TOPIC

        splits = json.loads((out / SPLITS_FILE).read_text())
        train, validation, heldout = splits["train"], splits["validation"], splits["heldout"]
        assert (len(train), len(validation), len(heldout)) == (9, 3, 4)
        assert set(train) | set(validation) | set(heldout) == set(queries)
        assert not set(train) & set(validation)
        assert not set(heldout) & (set(train) | set(validation))
        assert read_qrels(out / HELDOUT_QRELS) == {q: qrels[q] for q in heldout}

        negatives = json.loads((out / NEGATIVES_FILE).read_text())
        assert set(negatives) == set(train)
        for query_id, chosen in negatives.items():
            assert chosen, f"{query_id} got no hard negatives"
            assert all(qrels[query_id].get(doc, 0) <= 0 for doc in chosen), "never judged relevant"
            first_stage = search(
                tiny_sidecar.url,
                {
                    "index": index,
                    "query": queries[query_id],
                    "k": CANDIDATES,
                    "candidates": CANDIDATES,
                    "rerank": False,
                },
            )
            ranked = [hit["id"] for hit in first_stage["hits"]]
            assert chosen == [doc for doc in ranked if qrels[query_id].get(doc, 0) <= 0][:NEGATIVES]

        card = (out / "README.md").read_text()
        pairs = sum(2 + len(chosen) for chosen in negatives.values())
        assert f"| training pairs | {pairs} |" in card
        assert "| training queries | 9 |" in card
        assert "| validation queries | 3 |" in card
        for when in ("before (base)", "after"):
            value = re.search(rf"\| validation nDCG@10 {re.escape(when)} \| ([0-9.]+) \|", card)
            assert value, when
            assert 0.0 <= float(value.group(1)) <= 1.0, when
        assert "sidecar train-reranker --dataset" in card
        alpha = re.search(r"\| recommended `SIDECAR_ALPHA` \| ([0-9.]+) \|", card)
        assert alpha, "the blend weight chosen on the validation queries"
        assert 0.0 <= float(alpha.group(1)) <= 1.0
        assert not (out / "checkpoints").exists()

        with running_sidecar(opensearch.url, out, encoder) as trained:
            answer = search(
                trained.url, {"index": index, "query": queries[heldout[0]], "k": 5, "rerank": True}
            )
            assert answer["rerank"]["pairs_scored"] > 0
            assert len({hit["rerank_score"] for hit in answer["hits"]}) > 1, (
                "the trained head scores"
            )

            report_dir = tmp_path / "eval"
            assert (
                main(
                    [
                        "eval",
                        "--dataset",
                        str(dataset),
                        "--index",
                        index,
                        "--qrels",
                        str(out / HELDOUT_QRELS),
                        "--modes",
                        "hybrid,hybrid+rerank",
                        "--candidates",
                        str(CANDIDATES),
                        "--url",
                        trained.url,
                        "--opensearch",
                        opensearch.url,
                        "--out",
                        str(report_dir),
                    ]
                )
                == 0
            )
        report = json.loads((report_dir / "report.json").read_text())
        assert report["queries"] == len(heldout)
        assert set(report["per_query_ndcg@10"]["hybrid+rerank"]) == set(heldout)
        gain = report["rerank_gain"]
        assert gain["wins"] + gain["ties"] + gain["losses"] == len(heldout)
        assert gain["ci95"][0] <= gain["mean"] <= gain["ci95"][1]
        assert (report_dir / "rerank_gain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        opensearch.client.indices.delete(index=index, ignore_unavailable=True)
