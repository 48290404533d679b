"""The whole `sidecar train-reranker` flow on a BEIR collection."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from sidecar.config import Normalization
from sidecar.embedding import resolve_model_source
from sidecar.evaluation import read_qrels, read_queries
from sidecar.rerank.final_scorer import Serving, write_serving
from sidecar.training import FEW_VALIDATION_QUERIES, HELDOUT_QRELS
from sidecar.training.card import write_model_card
from sidecar.training.cross_fit import check_cross_fit, cross_fit_reranker, default_folds
from sidecar.training.data import (
    NEGATIVES_FILE,
    SPLITS_FILE,
    Labels,
    NegativeSampling,
    ValidationQuery,
    build_examples,
    build_triples,
    first_stage_candidates,
    mine_negatives,
    pseudo_examples,
    pseudo_queries,
    read_documents,
    split_queries,
    write_qrels,
)
from sidecar.training.fit import (
    FitOptions,
    TrainingReport,
    check_layers,
    configured_layers,
    distill_cross_encoder,
    is_cross_encoder,
    train_cross_encoder,
)
from sidecar.training.selection import DEPTHS, choose_serving, score_candidates

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOptions:
    """`sidecar train-reranker`'s choices beyond the data, base model and output."""

    # Share of the judged queries never trained or validated on, written as heldout-qrels.tsv for
    # `sidecar eval`; 0 trains on all of them.
    holdout_share: float = 0.2
    validation_share: float = 0.2
    # Mined per query, and the depth the model is validated and early-stopped at: the sidecar's
    # default candidate depth, so validation sees what serving will rerank.
    candidates: int = 100
    # Per training query; distilling, per relevant document of it.
    negatives: int = 4
    negative_sampling: NegativeSampling = "top"
    labels: Labels = "binary"
    # Pseudo-queries from the corpus to pre-train on (`data.pseudo_queries`); 0, the default, is
    # off: on SciFact's validation queries, pre-training a fresh head on 1,000 title pseudo-queries
    # left it at the label prior (loss at the labels' entropy), half what the judgments teach.
    pseudo_queries: int = 0
    # Distil this trained cross-encoder into a student of `layers` layers instead of fine-tuning
    # the base; without a teacher, `layers` cuts the base.
    teacher: str | None = None
    layers: int | None = None
    fit: FitOptions = field(default_factory=FitOptions)
    # K >= 2: train and validation queries are not split but dealt into K folds and cross-fitted
    # (`cross_fit`), so the serving choices rest on all of them; 0 is off; None, the default,
    # cross-fits a fine-tune whose validation share would be too few queries to choose by
    # (`cross_fit.default_folds`).
    cross_fit_folds: int | None = None
    # How the sidecar that will serve the model normalizes rerank scores, for the blend choice.
    normalization: Normalization = "sigmoid"


def check_start(base: str, options: TrainOptions) -> None:
    """Refuses, from the models' configs alone and so before any index load or mining, a teacher
    without the student's `layers`, a teacher that is not a cross-encoder, a fresh head the base
    cannot take (`check_head`), and `layers` that do not cut the model training starts from
    (`check_layers`), cross-fitting a distillation or a schedule that chooses checkpoints
    (`check_cross_fit`), and graded labels for a distillation, which has none. Raises
    ValueError."""
    if options.cross_fit_folds:
        if options.teacher is not None:
            raise ValueError("cross-fitting is for fine-tunes: a distillation is not cross-fitted")
        check_cross_fit(options.cross_fit_folds, options.fit)
    if options.teacher is not None and options.labels != "binary":
        raise ValueError("a distillation learns the teacher's margins: it takes no graded labels")
    start = resolve_model_source(options.teacher or base)
    if options.teacher is not None:
        if options.layers is None:
            raise ValueError("distilling needs the student's depth: layers")
        if not is_cross_encoder(start):
            raise ValueError(f"the teacher {options.teacher!r} is not a cross-encoder")
    elif not is_cross_encoder(start):
        from sidecar.rerank.heads import check_head

        check_head(start, options.fit.head)
    if options.layers is not None:
        check_layers(options.layers, configured_layers(start))


def train_reranker(
    sidecar_url: str,
    index: str,
    dataset: Path,
    qrels_path: Path,
    base: str,
    out_dir: Path,
    options: TrainOptions,
    command: str,
) -> TrainedReranker:
    """The whole `sidecar train-reranker` flow on a BEIR folder whose corpus is loaded in `index`:
    split the judged queries, mine negatives through the sidecar at `sidecar_url`, fine-tune
    `base` (or, with `options.teacher`, distil the teacher and leave `base` unused), choose the
    serving choices on the validation queries (with `options.cross_fit_folds`, on all train and
    validation queries, out of fold), and write the model, its card, the split (splits.json),
    the mined negatives (negatives.json) and the held-out judgments.

    Documents are read as the rerank stage reads them (title and text joined), so the model is
    trained on the input it is served. Raises ValueError when fewer than two queries are judged
    relevant (nothing to split) or, before anything is read, as `check_start` does; EvalError
    when the sidecar fails.
    """
    check_start(base, options)
    fit = options.fit
    qrels = read_qrels(qrels_path)
    judged = sorted(q for q, docs in qrels.items() if any(rel > 0 for rel in docs.values()))
    queries = read_queries(dataset / "queries.jsonl", judged)
    if len(queries) < 2:
        raise ValueError(f"{qrels_path} judges fewer than two queries of {dataset} relevant")
    usable, heldout = list(queries), list[str]()
    if options.holdout_share > 0:
        usable, heldout = split_queries(usable, options.holdout_share, fit.seed)
    train_ids, validation_ids = split_queries(usable, options.validation_share, fit.seed)
    folds = options.cross_fit_folds
    if folds is None:  # only where the validation share is too few queries to choose by
        folds = 0 if options.teacher else default_folds(len(validation_ids), len(usable), fit)
        if folds:
            log.info(
                "cross-fitting in %d folds by default: a validation share of %d queries is "
                "fewer than %d to choose by (--cross-fit-folds 0 keeps the split)",
                folds,
                len(validation_ids),
                FEW_VALIDATION_QUERIES,
            )
    cross_fitted_by_default = options.cross_fit_folds is None and folds > 0
    options = replace(options, cross_fit_folds=folds)
    if options.cross_fit_folds:
        # Every query is trained on and validated on, by different models.
        train_ids = validation_ids = sorted(usable)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SPLITS_FILE).write_text(
        json.dumps({"train": train_ids, "validation": validation_ids, "heldout": heldout}, indent=1)
        + "\n"
    )
    if heldout:
        write_qrels({q: qrels[q] for q in heldout}, out_dir / HELDOUT_QRELS)
    log.info(
        "queries: %d train, %d validation, %d held out",
        len(train_ids),
        len(validation_ids),
        len(heldout),
    )

    candidates = first_stage_candidates(
        sidecar_url,
        index,
        {q: queries[q] for q in dict.fromkeys(train_ids + validation_ids)},
        options.candidates,
        fit.progress,
    )
    wanted = {doc for ranked in candidates.values() for doc in ranked}
    wanted |= {doc for q in candidates for doc, rel in qrels[q].items() if rel > 0}
    documents = read_documents(dataset / "corpus.jsonl", wanted)
    negatives = mine_negatives(
        {q: list(candidates[q]) for q in train_ids},
        qrels,
        options.negatives,
        options.negative_sampling,
        fit.seed,
    )
    # What each query was trained against, to audit the negatives later.
    (out_dir / NEGATIVES_FILE).write_text(json.dumps(negatives, indent=1) + "\n")
    validation: dict[str, ValidationQuery] = {}
    for query_id in validation_ids:
        relevant = [
            documents[d] for d, rel in qrels[query_id].items() if rel > 0 and d in documents
        ]
        if relevant:
            ranked = [
                documents[d] for d in candidates[query_id] if d in documents
            ]  # the depth served
            validation[query_id] = (queries[query_id], relevant, ranked)
    train_queries = {q: queries[q] for q in train_ids}
    drawn = "the top" if options.negative_sampling == "top" else "a seeded sample of"
    negatives_described = (
        f"{drawn} {options.negatives} of {options.candidates} hybrid first-stage candidates "
        f"(index `{index}`) not judged relevant"
    )
    pretraining = cross_fitting = None
    scored = None
    if options.teacher is not None and options.layers is not None:
        triples = build_triples(train_queries, documents, qrels, negatives)
        log.info("training triples: %d; validation queries: %d", len(triples), len(validation))
        report = distill_cross_encoder(
            options.teacher, options.layers, triples, validation, out_dir, fit
        )
        negatives_described = f"each relevant document against {negatives_described}"
    else:
        pairs_of = partial(
            build_examples,
            documents=documents,
            qrels=qrels,
            negatives=negatives,
            labels=options.labels,
        )
        train = pairs_of(train_queries)
        log.info("training pairs: %d; validation queries: %d", len(train), len(validation))
        pretrained = None
        if options.pseudo_queries:
            pretrained = _pretrain(
                sidecar_url,
                index,
                dataset,
                base,
                options.pseudo_queries,
                validation,
                out_dir,
                options,
            )
        # A pre-trained start is already cut to `layers`.
        start, layers = (base, options.layers) if pretrained is None else (str(pretrained[0]), None)
        if options.cross_fit_folds:
            crossed = cross_fit_reranker(
                start,
                train_queries,
                train,
                validation,
                candidates,
                documents,
                pairs_of,
                out_dir,
                options.cross_fit_folds,
                fit,
                layers,
            )
            report, scored, cross_fitting = crossed.report, crossed.scored, crossed.description
            if cross_fitted_by_default:
                cross_fitting = (
                    f"by default, the validation share being fewer than {FEW_VALIDATION_QUERIES} "
                    f"queries: {cross_fitting}"
                )
        else:
            report = train_cross_encoder(
                start,
                train,
                validation,
                out_dir,
                fit,
                layers=layers,
                ndcg10_before=None if pretrained is None else pretrained[2].ndcg10_after,
            )
        if pretrained is not None:
            folder, pretraining, before = pretrained
            shutil.rmtree(folder)
            # The card's "before" is the base's, as without pre-training.
            report = replace(report, base=base, ndcg10_before=before.ndcg10_before)
    if scored is None:
        scored = score_candidates(
            out_dir,
            {q: queries[q] for q in validation},
            {q: candidates[q] for q in validation},
            documents,
            fit.device,
            fit.progress,
        )
    depths = [depth for depth in DEPTHS if depth < options.candidates] + [options.candidates]
    serving, figures = choose_serving(scored, qrels, options.normalization, depths, fit.seed)
    write_serving(out_dir, serving, figures)
    log.info(
        "serving: %s final scorer, rerank depth %s, alpha %g; validation gains by depth %s",
        figures["final_scorer"],
        serving.rerank_depth,
        serving.alpha,
        {
            d: round(e[figures["final_scorer"]]["gain"]["mean"], 4)
            for d, e in figures["depths"].items()
        },
    )
    if options.teacher is not None:
        labelled = ""  # the teacher's margins are the targets
    elif options.labels == "graded":
        labelled = "; relevant documents labelled their grade over the highest grade judged"
    else:
        labelled = "; relevant documents labelled 1 whatever their grade"
    description = (
        f"`{qrels_path}` of `{dataset}`{labelled}; negatives: {negatives_described}; "
        f"{len(heldout)} queries held out (`{HELDOUT_QRELS}`)"
    )
    write_model_card(report, command, description, (serving, figures), pretraining, cross_fitting)
    return TrainedReranker(report, serving, figures)


def _pretrain(
    sidecar_url: str,
    index: str,
    dataset: Path,
    base: str,
    count: int,
    validation: dict[str, ValidationQuery],
    out_dir: Path,
    options: TrainOptions,
) -> tuple[Path, str, TrainingReport] | None:
    """Pre-train `base` on up to `count` pseudo-queries from the corpus, negatives mined for each
    through the sidecar as for real queries; the model is written to OUT/pretrained, which the
    fine-tune starts from. Returns that folder, the card's description of what was done and the
    pre-training's report, or None when the corpus gives no pseudo-query."""
    started = time.perf_counter()
    fit = options.fit
    pseudo, corpus = pseudo_queries(dataset / "corpus.jsonl", count, fit.seed)
    if not pseudo:
        log.info("no pseudo-queries: no document has a title or a sentence to spare")
        return None
    mined = first_stage_candidates(
        sidecar_url,
        index,
        {entry.doc_id: entry.query for entry in pseudo},
        options.negatives + 1,
        fit.progress,
    )
    examples = pseudo_examples(
        pseudo, {doc: list(hits) for doc, hits in mined.items()}, corpus, options.negatives
    )
    methods = sorted({entry.method for entry in pseudo})
    log.info(
        "pre-training on %d pseudo-queries (%s): %d pairs", len(pseudo), methods, len(examples)
    )
    folder = out_dir / "pretrained"
    pretrained = train_cross_encoder(
        base,
        examples,
        validation,
        folder,
        replace(fit, early_stopping_patience=None),
        layers=options.layers,
    )
    seconds = time.perf_counter() - started
    return (
        folder,
        (
            f"{len(pseudo)} pseudo-queries ({', '.join(methods)}), {len(examples)} pairs, "
            f"{options.negatives} first-stage negatives each, seed {fit.seed}; {seconds:.0f} s; "
            f"validation nDCG@10 after it {pretrained.ndcg10_after:.4f}"
        ),
        pretrained,
    )


@dataclass(frozen=True)
class TrainedReranker:
    report: TrainingReport
    serving: Serving
    validation: dict[str, object]
