"""Fine-tuning a cross-encoder for the rerank stage from relevance judgments (offline, not on the
request path): split queries, mine hard negatives from the sidecar's own first stage, train with
sentence-transformers, and write a model the reranker loads (`CrossEncoderBackend(out_dir)`).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sidecar.device import select_device, select_dtype
from sidecar.evaluation import Qrels, evaluate_run, read_qrels, read_queries, search
from sidecar.indexing.corpus import read_corpus
from sidecar.indexing.templates import TEXT_FIELDS
from sidecar.retrieval.profiles import read_text
from sidecar.scoring import Normalization, blend, minmax_first_stage, normalize_scores

log = logging.getLogger(__name__)

# A training pair: query text, document text, label (1.0 judged relevant, 0.0 negative).
Example = tuple[str, str, float]
# Per validation query: its text, the relevant documents' texts, the first-stage candidates' texts.
ValidationQuery = tuple[str, list[str], list[str]]

_EVALUATOR_NAME = "validation"
# The trainer prefixes "eval_" and the evaluator its own name to the evaluator's primary metric.
_BEST_METRIC = f"eval_{_EVALUATOR_NAME}_ndcg@10"
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_FINE_TUNE_LEARNING_RATE = 2e-5
_NEW_HEAD_LEARNING_RATE = 1e-4
_ALPHAS = tuple(step / 10 for step in range(11))
# The judgments of the held-out queries, written beside the model for `sidecar eval --qrels`.
HELDOUT_QRELS = "heldout-qrels.tsv"
NEGATIVES_FILE = "negatives.json"
SPLITS_FILE = "splits.json"


@dataclass(frozen=True)
class TrainingReport:
    """What a training run did and how well the result ranks the validation queries."""

    base: str
    out_dir: Path
    train_pairs: int
    train_queries: int
    validation_queries: int
    epochs: int
    learning_rate: float
    ndcg10_before: float
    ndcg10_after: float
    seconds: float
    device: str
    precision: str
    model_bytes: int


def split_queries(
    query_ids: Sequence[str], validation_share: float = 0.2, seed: int = 13
) -> tuple[list[str], list[str]]:
    """(train, validation) query ids, disjoint and reproducible: the ids are sorted before a seeded
    shuffle, so the split depends only on the set of ids and the seed, never on input order.

    With two or more ids both parts get at least one. Raises ValueError when the share is not in
    (0, 1).
    """
    if not 0.0 < validation_share < 1.0:
        raise ValueError(f"validation_share must be in (0, 1), got {validation_share}")
    ordered = sorted(set(query_ids))
    random.Random(seed).shuffle(ordered)
    count = round(len(ordered) * validation_share)
    if len(ordered) >= 2:
        count = min(max(count, 1), len(ordered) - 1)
    return sorted(ordered[count:]), sorted(ordered[:count])


def mine_negatives(
    candidates_by_query: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Mapping[str, int]],
    per_query: int,
) -> dict[str, list[str]]:
    """Hard negatives per query: its first-stage candidates, in rank order, that are not judged
    relevant (relevance > 0), at most `per_query` of them.

    Documents judged 0 are kept: they are the hardest negatives there are. Unjudged candidates are
    assumed irrelevant (the usual, slightly noisy, assumption). Raises ValueError if
    `per_query` < 0.
    """
    if per_query < 0:
        raise ValueError(f"per_query must be >= 0, got {per_query}")
    negatives: dict[str, list[str]] = {}
    for query_id, candidates in candidates_by_query.items():
        judged = qrels.get(query_id, {})
        chosen: list[str] = []
        for doc_id in dict.fromkeys(candidates):  # first occurrence keeps the rank order
            if len(chosen) == per_query:
                break
            if judged.get(doc_id, 0) <= 0:
                chosen.append(doc_id)
        negatives[query_id] = chosen
    return negatives


def first_stage_candidates(
    sidecar_url: str,
    index: str,
    queries: Mapping[str, str],
    candidates: int,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """The fused first-stage candidates per query, id to fused score, best first, from a running
    sidecar's native API with rerank off: the negatives are then the documents the reranker will
    actually have to demote, and the scores are what a blend mixes with the reranker's.

    Raises EvalError when the sidecar cannot be reached or refuses a request.
    """
    ranked: dict[str, dict[str, float]] = {}
    for query_id, text in tqdm(
        queries.items(), desc="mining candidates", unit="query", disable=not progress
    ):
        body = {
            "index": index,
            "query": text,
            "k": candidates,
            "candidates": candidates,
            "rerank": False,
        }
        hits = search(sidecar_url, body)["hits"]
        ranked[query_id] = {hit["id"]: hit["first_stage"]["score"] for hit in hits}
    return ranked


def build_examples(
    queries: Mapping[str, str],
    documents: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    negatives: Mapping[str, Sequence[str]],
) -> list[Example]:
    """Training pairs for the queries in `queries`, in their order: each judged-relevant document
    labelled 1.0, then the query's negatives labelled 0.0.

    A query without a relevant document in `documents` contributes nothing, so every query trained
    on has both labels. Documents missing from `documents` (qrels naming ids absent from the
    corpus happen in real collections) are skipped. A negative that is judged relevant raises
    ValueError: it would teach the model the opposite of the judgments.
    """
    examples: list[Example] = []
    for query_id, query in queries.items():
        judged = qrels.get(query_id, {})
        relevant = [doc for doc, rel in judged.items() if rel > 0 and doc in documents]
        if not relevant:
            continue
        examples.extend((query, documents[doc], 1.0) for doc in relevant)
        for doc in negatives.get(query_id, ()):
            if judged.get(doc, 0) > 0:
                raise ValueError(f"negative {doc!r} of query {query_id!r} is judged relevant")
            if doc in documents:
                examples.append((query, documents[doc], 0.0))
    return examples


def train_cross_encoder(
    base: str,
    train: Sequence[Example],
    validation: Mapping[str, ValidationQuery],
    out_dir: Path,
    *,
    epochs: int = 1,
    batch_size: int = 16,
    learning_rate: float | None = None,
    max_length: int = 256,
    seed: int = 13,
    device: str = "auto",
    checkpoint_steps: int | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainingReport:
    """Fine-tune `base` (a Hub id or local path) on `train` with binary cross-entropy and write the
    best model, by validation nDCG@10, to `out_dir`.

    A plain encoder as `base` (a bi-encoder, a base LM) gets a fresh mean-pooling head (seeded;
    `cross_encoder_from_encoder`), and by default a larger learning rate than a cross-encoder. The
    model is evaluated and checkpointed in `out_dir/checkpoints` after each epoch, or every
    `checkpoint_steps` optimizer steps, so an interrupted run loses at most that much work and
    `resume` continues it from the last checkpoint (model, optimizer, scheduler and RNG states);
    the checkpoints are removed once the best model is written. nDCG@10 reranks each validation
    query's candidates with its relevant documents always included, so it measures the reranker
    alone, not first-stage recall.

    Raises ValueError when `train` or `validation` is empty, when `base` cannot be loaded, or
    when `out_dir` holds an interrupted run's checkpoints and `resume` is not set (starting over
    would discard them).
    """
    if not train:
        raise ValueError("no training pairs")
    if not validation:
        raise ValueError("no validation queries")
    checkpoints = out_dir / "checkpoints"
    interrupted = checkpoints.is_dir() and any(checkpoints.glob("checkpoint-*"))
    if interrupted and not resume:
        raise ValueError(
            f"{checkpoints} holds an interrupted run: resume it, or remove the folder to start over"
        )
    import transformers
    from datasets import Dataset
    from sentence_transformers.cross_encoder import (
        CrossEncoder,
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
    )
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    from sidecar.embedding import resolve_model_source
    from sidecar.rerank.backend import cross_encoder_from_encoder, has_relevance_head

    started = time.perf_counter()
    chosen_device = select_device(device)
    on_cuda = chosen_device.startswith("cuda")
    transformers.set_seed(seed)
    source = resolve_model_source(base)
    try:
        trained_head = has_relevance_head(source)
    except OSError as error:  # neither a folder nor a reachable Hub id
        raise ValueError(f"cannot load the base model {base!r}: {error}") from None
    if trained_head:
        model = CrossEncoder(source, num_labels=1, max_length=max_length, device=chosen_device)
        default_rate = _FINE_TUNE_LEARNING_RATE
    else:
        model = cross_encoder_from_encoder(source, max_length=max_length, device=chosen_device)
        default_rate = _NEW_HEAD_LEARNING_RATE
    # Fine-tuning a trained head takes small steps; a fresh head needs larger ones to move.
    learning_rate = learning_rate or default_rate
    evaluator = CrossEncoderRerankingEvaluator(
        samples=[
            {"query": query, "positive": relevant, "documents": candidates}
            for query, relevant, candidates in validation.values()
        ],
        at_k=10,
        name=_EVALUATOR_NAME,
        batch_size=batch_size,
        show_progress_bar=progress,
        write_csv=False,
    )
    ndcg_before = _ndcg10(evaluator(model))

    import torch

    # Mixed precision where the hardware computes it natively: bf16 on Ampere+ GPUs and on CPUs
    # with bf16 units (AMX, AVX512-BF16; about 1.5x the fp32 training speed there), else fp16 on
    # CUDA, else fp32. The saved weights stay fp32.
    if on_cuda:
        bf16 = torch.cuda.is_bf16_supported()
    else:
        bf16 = select_dtype("auto", chosen_device) == torch.bfloat16
    fp16 = on_cuda and not bf16
    args = CrossEncoderTrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=0.1,  # a float is a share of all steps
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        fp16=fp16,
        use_cpu=not on_cuda,
        eval_strategy="steps" if checkpoint_steps else "epoch",
        save_strategy="steps" if checkpoint_steps else "epoch",
        eval_steps=checkpoint_steps,
        save_steps=checkpoint_steps or 500,  # used only with the "steps" strategy
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model=_BEST_METRIC,
        greater_is_better=True,
        logging_strategy="steps" if checkpoint_steps else "epoch",
        logging_steps=checkpoint_steps or 500,
        report_to="none",
        disable_tqdm=not progress,
        dataloader_pin_memory=on_cuda,
    )
    dataset = Dataset.from_dict(
        {
            "query": [query for query, _, _ in train],
            "document": [text for _, text, _ in train],
            "label": [float(label) for _, _, label in train],
        }
    )
    trainer = CrossEncoderTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        loss=BinaryCrossEntropyLoss(model),
        evaluator=evaluator,
    )
    if interrupted:
        log.info("resuming the interrupted run in %s", checkpoints)
    trainer.train(resume_from_checkpoint=interrupted or None)
    best: Any = trainer.model
    ndcg_after = _ndcg10(evaluator(best))
    # Our own model card (write_model_card) replaces the library's generated one.
    best.save_pretrained(str(out_dir), create_model_card=False)
    shutil.rmtree(checkpoints)
    return TrainingReport(
        base=base,
        out_dir=out_dir,
        train_pairs=len(train),
        train_queries=len({query for query, _, _ in train}),
        validation_queries=len(validation),
        epochs=epochs,
        ndcg10_before=ndcg_before,
        ndcg10_after=ndcg_after,
        seconds=time.perf_counter() - started,
        device=chosen_device,
        precision="bf16 mixed" if bf16 else "fp16 mixed" if fp16 else "fp32",
        learning_rate=learning_rate,
        model_bytes=sum(
            path.stat().st_size
            for path in out_dir.rglob("*")
            if path.is_file() and path.name.endswith(_WEIGHT_SUFFIXES)
        ),
    )


def write_model_card(
    report: TrainingReport,
    command: str,
    data_description: str,
    blend_choice: BlendChoice | None = None,
) -> Path:
    """README.md beside the weights: what the model was made from and how well it ranks, so a
    directory found later still says where it came from. Returns the file written."""
    card = report.out_dir / "README.md"
    blend_rows = []
    if blend_choice is not None:
        blend_rows = [
            f"| recommended `SIDECAR_ALPHA` | {blend_choice.alpha:g} |",
            "| validation nDCG@10 over the first-stage candidates: first stage / reranker alone / "
            f"blend | {blend_choice.first_stage:.4f} / {blend_choice.reranker:.4f} / "
            f"{blend_choice.ndcg10:.4f} |",
        ]
    card.write_text(
        "\n".join(
            [
                f"# Cross-encoder reranker fine-tuned from {report.base}",
                "",
                "A single-logit relevance cross-encoder for the sidecar's rerank stage; load it "
                f"with `SIDECAR_RERANKER_MODEL={report.out_dir}`.",
                "",
                "| | |",
                "|---|---|",
                f"| base model | `{report.base}` |",
                f"| data | {data_description} |",
                f"| training queries | {report.train_queries} |",
                f"| training pairs | {report.train_pairs} |",
                f"| validation queries | {report.validation_queries} |",
                f"| epochs | {report.epochs} |",
                f"| learning rate | {report.learning_rate:g} |",
                f"| validation nDCG@10 before (base) | {report.ndcg10_before:.4f} |",
                f"| validation nDCG@10 after | {report.ndcg10_after:.4f} |",
                f"| training time | {report.seconds:.1f} s on {report.device}, {report.precision} |",
                f"| weights | {report.model_bytes} bytes |",
                *blend_rows,
                "",
                "Validation nDCG@10 before and after reranks each validation query's first-stage "
                "candidates with its relevant documents always included (the reranker alone). "
                "The blend rows rank only the candidates, as serving does: final score = alpha x "
                "normalized rerank score + (1 - alpha) x min-max first-stage score.",
                "",
                "Made with:",
                "",
                "```sh",
                command,
                "```",
                "",
            ]
        ),
        encoding="utf-8",
    )
    return card


@dataclass(frozen=True)
class TrainOptions:
    """`sidecar train-reranker`'s choices beyond the data, base model and output."""

    # Share of the judged queries never trained or validated on, written as heldout-qrels.tsv for
    # `sidecar eval`; 0 trains on all of them.
    holdout_share: float = 0.2
    validation_share: float = 0.2
    candidates: int = 20
    negatives: int = 4
    epochs: int = 1
    batch_size: int = 16
    learning_rate: float | None = None  # by the base: see train_cross_encoder
    max_length: int = 256
    seed: int = 13
    device: str = "auto"
    checkpoint_steps: int | None = None
    resume: bool = False
    progress: bool = True
    # How the sidecar that will serve the model normalizes rerank scores, for the blend choice.
    normalization: Normalization = "sigmoid"


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
    split the judged queries, mine negatives through the sidecar at `sidecar_url`, fine-tune,
    choose the blend weight on the validation queries, and write the model, its card, the split
    (splits.json), the mined negatives (negatives.json) and the held-out judgments.

    Documents are read as the rerank stage reads them (title and text joined), so the model is
    trained on the input it is served. Raises ValueError when fewer than two queries are judged
    relevant (nothing to split), EvalError when the sidecar fails.
    """
    qrels = read_qrels(qrels_path)
    judged = sorted(q for q, docs in qrels.items() if any(rel > 0 for rel in docs.values()))
    queries = read_queries(dataset / "queries.jsonl", judged)
    if len(queries) < 2:
        raise ValueError(f"{qrels_path} judges fewer than two queries of {dataset} relevant")
    usable, heldout = list(queries), list[str]()
    if options.holdout_share > 0:
        usable, heldout = split_queries(usable, options.holdout_share, options.seed)
    train_ids, validation_ids = split_queries(usable, options.validation_share, options.seed)
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
        {q: queries[q] for q in train_ids + validation_ids},
        options.candidates,
        options.progress,
    )
    wanted = {doc for ranked in candidates.values() for doc in ranked}
    wanted |= {doc for q in candidates for doc, rel in qrels[q].items() if rel > 0}
    documents = read_documents(dataset / "corpus.jsonl", wanted)
    negatives = mine_negatives(
        {q: list(candidates[q]) for q in train_ids}, qrels, options.negatives
    )
    # What each query was trained against, to audit the negatives later.
    (out_dir / NEGATIVES_FILE).write_text(json.dumps(negatives, indent=1) + "\n")
    train = build_examples({q: queries[q] for q in train_ids}, documents, qrels, negatives)
    validation: dict[str, ValidationQuery] = {}
    for query_id in validation_ids:
        relevant = [
            documents[d] for d, rel in qrels[query_id].items() if rel > 0 and d in documents
        ]
        if relevant:
            ranked = [documents[d] for d in candidates[query_id] if d in documents]
            validation[query_id] = (queries[query_id], relevant, ranked)
    log.info("training pairs: %d; validation queries: %d", len(train), len(validation))

    report = train_cross_encoder(
        base,
        train,
        validation,
        out_dir,
        epochs=options.epochs,
        batch_size=options.batch_size,
        learning_rate=options.learning_rate,
        max_length=options.max_length,
        seed=options.seed,
        device=options.device,
        checkpoint_steps=options.checkpoint_steps,
        resume=options.resume,
        progress=options.progress,
    )
    blend_choice = choose_alpha(
        score_candidates(
            out_dir,
            {q: queries[q] for q in validation},
            {q: candidates[q] for q in validation},
            documents,
            options.device,
            options.progress,
        ),
        qrels,
        options.normalization,
    )
    log.info(
        "blend: alpha %g, validation nDCG@10 %.4f (first stage %.4f, reranker alone %.4f)",
        blend_choice.alpha,
        blend_choice.ndcg10,
        blend_choice.first_stage,
        blend_choice.reranker,
    )
    description = (
        f"`{qrels_path}` of `{dataset}`; negatives: the top {options.negatives} of "
        f"{options.candidates} hybrid first-stage candidates (index `{index}`) not judged "
        f"relevant; {len(heldout)} queries held out (`{HELDOUT_QRELS}`)"
    )
    write_model_card(report, command, description, blend_choice)
    return TrainedReranker(report, blend_choice)


@dataclass(frozen=True)
class BlendChoice:
    """The `SIDECAR_ALPHA` that ranks the validation queries' candidates best, with the
    validation nDCG@10 it gives and the two ends it was chosen between."""

    alpha: float
    ndcg10: float
    first_stage: float  # alpha 0
    reranker: float  # alpha 1


@dataclass(frozen=True)
class TrainedReranker:
    report: TrainingReport
    blend: BlendChoice


# Scored candidates of one query: ids in first-stage order, fused scores, reranker logits.
ScoredCandidates = tuple[list[str], list[float], list[float]]


def score_candidates(
    model_dir: Path,
    queries: Mapping[str, str],
    candidates: Mapping[str, Mapping[str, float]],
    documents: Mapping[str, str],
    device: str = "auto",
    progress: bool = True,
) -> dict[str, ScoredCandidates]:
    """Each query's candidates scored by the model in `model_dir` through the serving backend
    (same device, dtype and truncation as `sidecar serve`)."""
    from sidecar.rerank.backend import CrossEncoderBackend, ScoringPair

    backend = CrossEncoderBackend(str(model_dir), device=device)
    scored: dict[str, ScoredCandidates] = {}
    for query_id, query in tqdm(
        queries.items(), desc="scoring validation", unit="query", disable=not progress
    ):
        ids = [doc for doc in candidates[query_id] if doc in documents]
        if not ids:
            continue
        logits = backend.score([ScoringPair(query, documents[doc], 0) for doc in ids])
        scored[query_id] = (ids, [candidates[query_id][doc] for doc in ids], logits)
    return scored


def choose_alpha(
    scored: Mapping[str, ScoredCandidates], qrels: Qrels, normalization: Normalization
) -> BlendChoice:
    """The blend weight in 0, 0.1, ..., 1 with the best nDCG@10 over the validation queries'
    candidates, scored as the sidecar's blend scores them; on a tie the larger weight (more
    reranker). A reranker that knows less than the first stage gets a small weight, or 0."""
    judged = {q: qrels[q] for q in scored}
    by_alpha: dict[float, float] = {}
    for alpha in _ALPHAS:
        run = {
            q: dict(
                zip(
                    ids,
                    blend(
                        normalize_scores(logits, normalization),
                        minmax_first_stage(fused),
                        alpha,
                    ),
                    strict=True,
                )
            )
            for q, (ids, fused, logits) in scored.items()
        }
        by_alpha[alpha] = evaluate_run(judged, run)["ndcg@10"]
    best = max(reversed(_ALPHAS), key=lambda alpha: by_alpha[alpha])
    return BlendChoice(best, by_alpha[best], by_alpha[0.0], by_alpha[1.0])


def write_qrels(qrels: Qrels, path: Path) -> None:
    """BEIR qrels TSV with its header, as `read_qrels` and `sidecar eval --qrels` read it."""
    lines = ["query-id\tcorpus-id\tscore"]
    lines += [f"{q}\t{doc}\t{rel}" for q, docs in qrels.items() for doc, rel in docs.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_documents(corpus: Path, wanted: set[str]) -> dict[str, str]:
    """The texts of the `wanted` ids in a BEIR corpus, as the rerank stage builds them."""
    return {
        doc.id: read_text({"title": doc.title, "text": doc.text}, TEXT_FIELDS)
        for doc in read_corpus(corpus)
        if doc.id in wanted
    }


def _ndcg10(metrics: Mapping[str, Any]) -> float:
    return float(metrics[f"{_EVALUATOR_NAME}_ndcg@10"])
