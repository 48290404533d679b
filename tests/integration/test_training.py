"""`sidecar train-reranker` end to end: a generated collection loaded through the command, hard
negatives mined through the real sidecar's first stage, a real (tiny) fine-tuning, and the model
it writes served as the reranker and evaluated on the queries it held out; then that model as the
teacher distilled into a 2-layer student."""

from __future__ import annotations

import io
import json
import math
import random
import re
import shlex
import shutil
import urllib.request
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from sidecar.cli import main
from sidecar.config import SettingsError
from sidecar.embedding import BiEncoder
from sidecar.evaluation import read_qrels, search
from sidecar.rerank.backend import CrossEncoderBackend, ScoringPair
from sidecar.rerank.final_scorer import (
    FEATURES,
    SERVING_FILE,
    SERVING_VERSION,
    LearnedScorer,
    Serving,
    read_serving,
    write_serving,
)
from sidecar.rerank.heads import load_saved_cross_encoder
from sidecar.training import DEFAULT_FOLDS, FEW_VALIDATION_QUERIES, HELDOUT_QRELS
from sidecar.training.data import NEGATIVES_FILE, SPLITS_FILE, build_triples, read_documents
from sidecar.training.fit import score_margins, truncate_layers
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
STUDENT_EPOCHS = "3"


def generate_collection(folder: Path, seed: int = 3) -> dict[str, dict[str, int]]:
    """A BEIR folder of seeded topic texts; returns its qrels. Per query the topic's first two
    documents are relevant (graded 2 and 1), the third is judged not relevant, the rest are
    unjudged."""
    rng = random.Random(seed)
    documents, queries, qrels = [], {}, {}
    for topic, words in TOPIC_WORDS.items():
        vocabulary = words.split()
        for n in range(DOCS_PER_TOPIC):
            text = " ".join(rng.choices(vocabulary, k=12))
            title = f"{topic} {vocabulary[n]} {vocabulary[n + 1]}"
            documents.append((f"{topic}-{n}", title, f"The {topic}: {text}."))
        for n in range(2):
            query_id = f"{topic}-q{n}"
            queries[query_id] = " ".join(rng.sample(vocabulary, 3))
            qrels[query_id] = {f"{topic}-0": 2, f"{topic}-1": 1, f"{topic}-2": 0}
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


def train_arguments(
    dataset: Path, index: str, out: Path, sidecar_url: str, opensearch_url: str
) -> list[str]:
    """`sidecar train-reranker` as both tests run it: small shares and pairs, CPU."""
    return [
        "train-reranker",
        "--dataset",
        str(dataset),
        "--index",
        index,
        "--out",
        str(out),
        "--url",
        sidecar_url,
        "--opensearch",
        opensearch_url,
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


@dataclass(frozen=True)
class TrainedRun:
    dataset: Path
    index: str
    out: Path
    qrels: dict[str, dict[str, int]]
    queries: dict[str, str]
    # The sidecar the negatives were mined through (the untrained stand-in as its reranker).
    first_stage: RunningSidecar
    printed: str  # what the command printed

    def arguments(self, out: Path, opensearch_url: str) -> list[str]:
        """This run's command for another model in `out`, mining through the same sidecar."""
        return train_arguments(self.dataset, self.index, out, self.first_stage.url, opensearch_url)


@pytest.fixture(scope="module")
def trained(
    opensearch: Cluster,
    encoder: BiEncoder,
    tiny_cross_encoder: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TrainedRun]:
    """`sidecar train-reranker` run once on the generated collection, which it loads; the
    distillation test takes the model it writes as its teacher."""
    folder = tmp_path_factory.mktemp("training")
    dataset, out, index = folder / "generated", folder / "reranker", "test-train-generated"
    qrels = generate_collection(dataset)
    queries = {
        entry["_id"]: entry["text"]
        for entry in map(json.loads, (dataset / "queries.jsonl").read_text().splitlines())
    }
    try:
        with running_sidecar(opensearch.url, tiny_cross_encoder, encoder) as first_stage:
            # Pre-training is this module's last test's and cross-fitting its own test's: here
            # the judgments alone, and the validation share.
            arguments = train_arguments(dataset, index, out, first_stage.url, opensearch.url)
            printed = io.StringIO()
            with redirect_stdout(printed):
                assert main([*arguments, "--pseudo-queries", "0", "--cross-fit-folds", "0"]) == 0
            yield TrainedRun(dataset, index, out, qrels, queries, first_stage, printed.getvalue())
    finally:
        opensearch.client.indices.delete(index=index, ignore_unavailable=True)


def printed_line(printed: str, label: str) -> str:
    """The command after `label` on the line of `printed` that starts with it."""
    lines = [line for line in printed.splitlines() if line.startswith(label)]
    assert len(lines) == 1, f"one {label!r} line in {printed[-2000:]}"
    return lines[0].removeprefix(label).strip()


def test_train_reranker_mines_trains_and_the_model_serves_and_evaluates(
    opensearch: Cluster, encoder: BiEncoder, trained: TrainedRun, tmp_path: Path
) -> None:
    out, index = trained.out, trained.index
    qrels, queries = trained.qrels, trained.queries
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
            trained.first_stage.url,
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
    assert "| transformer layers | 6 |" in card
    assert "| relevance head | new: cosine of the query's" in card, "the default head"
    modules = json.loads((out / "modules.json").read_text())
    assert modules[-1]["type"] == "sidecar.rerank.heads.SegmentCosine"
    for when in ("before (base)", "after"):
        value = re.search(rf"\| validation nDCG@10 {re.escape(when)} \| ([0-9.]+) \|", card)
        assert value, when
        assert 0.0 <= float(value.group(1)) <= 1.0, when
    assert "sidecar train-reranker --dataset" in card
    alpha = re.search(r"\| recommended `SIDECAR_ALPHA` \(the blend\) \| ([0-9.]+) \|", card)
    assert alpha, "the blend weight chosen on the validation queries"
    assert 0.0 <= float(alpha.group(1)) <= 1.0
    assert not (out / "checkpoints").exists()
    serve = shlex.split(printed_line(trained.printed, "serve it:"))
    assert serve[0] == f"SIDECAR_RERANKER_MODEL={out.resolve()}"
    assert serve[1] == "SIDECAR_REPORT_CACHE_STATS=true", "the printed eval measures rerank cost"
    assert Path(serve[2]).is_file(), "the weight is the model's own: no SIDECAR_ALPHA to copy"
    assert serve[3] == "serve"
    assert serve[serve.index("--opensearch") + 1] == opensearch.url

    with running_sidecar(opensearch.url, out, encoder) as served:
        answer = search(
            served.url, {"index": index, "query": queries[heldout[0]], "k": 5, "rerank": True}
        )
        assert answer["rerank"]["pairs_scored"] > 0
        assert len({hit["rerank_score"] for hit in answer["hits"]}) > 1, "the trained head scores"

        report_dir = tmp_path / "eval"
        # The evaluation the command printed, as printed, at the sidecar serving the model here
        # (the printed --url is the default listen port) and with the reranked mode added.
        evaluate = shlex.split(printed_line(trained.printed, "evaluate it:"))
        assert Path(evaluate[0]).is_file()
        assert evaluate[1] == "eval"
        assert evaluate[evaluate.index("--qrels") + 1] == str((out / HELDOUT_QRELS).resolve())
        assert (
            main(
                [
                    *evaluate[1:],
                    "--modes",
                    "hybrid,hybrid+rerank",
                    "--url",
                    served.url,
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


def test_train_reranker_distils_a_two_layer_student_that_serves_and_follows_its_teacher(
    opensearch: Cluster, encoder: BiEncoder, trained: TrainedRun, tmp_path: Path
) -> None:
    student_dir = tmp_path / "student"
    arguments = trained.arguments(student_dir, opensearch.url)
    arguments += ["--teacher", str(trained.out), "--layers", "2", "--epochs", STUDENT_EPOCHS]
    assert main(arguments) == 0

    student = load_saved_cross_encoder(str(student_dir), device="cpu")
    assert student.transformers_model.config.num_hidden_layers == 2
    assert len(student.transformers_model.base_model.encoder.layer) == 2
    card = (student_dir / "README.md").read_text()
    assert f"| teacher | `{trained.out}`, 6 layers |" in card
    assert "| transformer layers | 2 (the teacher's first 2" in card
    quality = re.search(
        r"\| validation nDCG@10: teacher / student \| ([0-9.]+) / ([0-9.]+) \|", card
    )
    assert quality, "both models' validation nDCG@10"
    assert all(0.0 <= float(value) <= 1.0 for value in quality.groups())
    speed = re.search(r"teacher / student \| ([0-9.]+) / ([0-9.]+) \(", card)
    assert speed, "both models' measured pairs/s"
    teacher_speed, student_speed = float(speed.group(1)), float(speed.group(2))
    assert teacher_speed > 0
    assert student_speed > 0
    assert not (student_dir / "checkpoints").exists()

    # Same seed and shares, so the student holds out the teacher's held-out queries: neither
    # model has trained on these pairs.
    splits = json.loads((student_dir / SPLITS_FILE).read_text())
    assert splits == json.loads((trained.out / SPLITS_FILE).read_text())
    every_document = {f"{topic}-{n}" for topic in TOPIC_WORDS for n in range(DOCS_PER_TOPIC)}
    documents = read_documents(trained.dataset / "corpus.jsonl", every_document)
    heldout_pairs = [
        ScoringPair(trained.queries[q], text, 0)
        for q in splits["heldout"]
        for text in documents.values()
    ]
    teacher_scores, student_scores = (
        CrossEncoderBackend(str(model), device="cpu", dtype="float32").score(heldout_pairs)
        for model in (trained.out, student_dir)
    )
    # Observed 0.70 to 0.78 on these 160 pairs for students of this teacher trained at learning
    # rates 2e-5 to 1e-4; 0.5 leaves room for other machines' numerics and still fails a student
    # that ranks by something else than its teacher.
    assert scipy.stats.spearmanr(teacher_scores, student_scores).statistic > 0.5

    # The training, not only the initialisation, brought the student to its teacher: on the
    # triples it trained on, its margins are closer to the teacher's than those of its starting
    # point, the teacher cut to 2 layers.
    triples = build_triples(
        {q: trained.queries[q] for q in splits["train"]},
        documents,
        trained.qrels,
        json.loads((student_dir / NEGATIVES_FILE).read_text()),
    )
    start = load_saved_cross_encoder(str(trained.out), device="cpu", max_length=64)
    truncate_layers(start.transformers_model, 2)
    margins = {
        name: np.array(score_margins(model, triples, batch_size=8, progress=False)[0])
        for name, model in [
            ("teacher", load_saved_cross_encoder(str(trained.out), device="cpu", max_length=64)),
            ("start", start),
            ("student", student),
        ]
    }
    start_error = np.mean((margins["start"] - margins["teacher"]) ** 2)
    assert np.mean((margins["student"] - margins["teacher"]) ** 2) < start_error

    with running_sidecar(opensearch.url, student_dir, encoder) as served:
        answer = search(
            served.url,
            {
                "index": trained.index,
                "query": trained.queries[splits["heldout"][0]],
                "k": 5,
                "rerank": True,
            },
        )
    assert answer["rerank"]["pairs_scored"] > 0
    assert len({hit["rerank_score"] for hit in answer["hits"]}) > 1, "the student's head scores"


def test_pseudo_query_pretraining_a_listwise_loss_and_early_stopping_train_and_serve(
    opensearch: Cluster, encoder: BiEncoder, trained: TrainedRun, tmp_path: Path
) -> None:
    out = tmp_path / "listwise"
    arguments = trained.arguments(out, opensearch.url)
    arguments += ["--pseudo-queries", "12", "--loss", "listnet"]
    arguments += ["--epochs", "3", "--early-stopping-patience", "1"]
    assert main(arguments) == 0

    card = (out / "README.md").read_text()
    assert "| loss | ListNet over each query's relevant documents and negatives |" in card
    pretraining = re.search(
        r"\| pre-training on the corpus \| (\d+) pseudo-queries \(title\)", card
    )
    assert pretraining, card
    assert int(pretraining.group(1)) == 12
    assert not (out / "pretrained").exists(), "the pre-trained start is removed"
    assert f"| {CANDIDATES} | " in card, "the validation table has the served depth"
    serving = json.loads((out / SERVING_FILE).read_text())
    assert serving["version"] == SERVING_VERSION
    assert serving["validation"]["final_scorer"] in {"learned", "blend"}
    assert list(serving["validation"]["depths"]) == [str(CANDIDATES)]
    assert read_serving(out) is not None, "the file this command writes is one serve reads"

    # Serving follows the file: a scorer that puts the first-stage order first whatever the
    # logits, and a depth of 3, give the first-stage order with the rest flagged below depth.
    by_rank = tuple(-20.0 if name == "first_stage_log_rank" else 0.0 for name in FEATURES)
    scorer = LearnedScorer((0.0,) * len(FEATURES), (1.0,) * len(FEATURES), by_rank, 0.0)
    write_serving(out, Serving(rerank_depth=3, final_scorer=scorer, alpha=1.0), {})
    query = trained.queries[json.loads((out / SPLITS_FILE).read_text())["heldout"][0]]
    body = {"index": trained.index, "query": query, "k": CANDIDATES, "rerank": True}
    with running_sidecar(opensearch.url, out, encoder, rerank_depth=None) as served:
        hits = search(served.url, body)["hits"]
        assert [hit["first_stage"]["rank"] for hit in hits] == sorted(
            hit["first_stage"]["rank"] for hit in hits
        )
        assert [bool(hit.get("below_depth")) for hit in hits[:4]] == [False, False, False, True]
        expected = 1 / (1 + math.exp(20.0 * math.log1p(1)))
        assert hits[1]["score"] == pytest.approx(expected)
        with urllib.request.urlopen(f"{served.url}/metrics") as response:
            exported = response.read().decode()
        assert (
            'sidecar_reranker_serving_info{final_scorer="learned",rerank_depth="3",'
            'validation="unrecorded"} 1.0'
        ) in exported, "a file written without `gained` says nothing of its validation"
    with running_sidecar(opensearch.url, out, encoder, final_scorer="blend") as served:
        hit = search(served.url, body)["hits"][0]
        assert hit["score"] == pytest.approx(1 / (1 + math.exp(-hit["rerank_score"])))


def test_few_validation_queries_cross_fit_by_default_on_graded_labels_and_serve_a_model_trained_on_all(
    opensearch: Cluster, encoder: BiEncoder, trained: TrainedRun, tmp_path: Path
) -> None:
    out = tmp_path / "cross-fitted"
    arguments = trained.arguments(out, opensearch.url)
    assert main([*arguments, "--labels", "graded"]) == 0

    splits = json.loads((out / SPLITS_FILE).read_text())
    assert splits["train"] == splits["validation"], "every query trained on and validated on"
    assert not set(splits["train"]) & set(splits["heldout"])
    assert splits["heldout"] == json.loads((trained.out / SPLITS_FILE).read_text())["heldout"]
    usable = len(splits["train"])
    card = (out / "README.md").read_text()
    assert (
        f"| cross-fitting | by default, the validation share being fewer than "
        f"{FEW_VALIDATION_QUERIES} queries: {DEFAULT_FOLDS} fold models, each trained on the "
        "other folds' queries"
    ) in card
    assert f"out of fold over all {usable} queries" in card
    assert f"| validation queries | {usable} |" in card
    assert f"| training queries | {usable} |" in card, "the model served trained on all"
    assert "relevant documents labelled their grade over the highest grade judged" in card
    assert "labelled 1 whatever their grade" in (trained.out / "README.md").read_text()
    serving = json.loads((out / SERVING_FILE).read_text())
    assert serving["validation"]["queries"] == usable, "the serving choices rest on all of them"
    assert not (out / "folds").exists(), "the fold models are removed"
    assert read_serving(out) is not None

    query = trained.queries[splits["heldout"][0]]
    with running_sidecar(opensearch.url, out, encoder) as served:
        answer = search(served.url, {"index": trained.index, "query": query, "k": 5})
    assert answer["rerank"]["applied"] is True
    assert answer["rerank"]["pairs_scored"] > 0


def test_a_serving_file_of_another_version_is_refused_at_start(
    opensearch: Cluster, encoder: BiEncoder, trained: TrainedRun, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(trained.out, model)
    entry = json.loads((model / SERVING_FILE).read_text())
    (model / SERVING_FILE).write_text(json.dumps({**entry, "version": SERVING_VERSION + 1}))
    with (
        pytest.raises(SettingsError, match="version"),
        running_sidecar(opensearch.url, model, encoder),
    ):
        pass
