"""Fine-tuning a cross-encoder for the rerank stage from relevance judgments (offline, not on the
request path): split queries, mine hard negatives from the sidecar's own first stage, train with
sentence-transformers (or distil a trained teacher into a shallower student), and write a model
the reranker loads (`CrossEncoderBackend(out_dir)`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sidecar.device import select_device, select_dtype
from sidecar.embedding import resolve_model_source
from sidecar.evaluation import Qrels, evaluate_run, read_qrels, read_queries, search
from sidecar.indexing.corpus import read_corpus
from sidecar.indexing.templates import TEXT_FIELDS
from sidecar.retrieval.profiles import read_text
from sidecar.scoring import Normalization, blend, minmax_first_stage, normalize_scores

log = logging.getLogger(__name__)

# A training pair: query text, document text, label (1.0 judged relevant, 0.0 negative).
Example = tuple[str, str, float]
# A distillation triple: query text, a judged-relevant document's text, a negative's text.
Triple = tuple[str, str, str]
# The trainer's dataset, column name to values: the loss's inputs in the order it reads them, then
# its target as "label".
Columns = dict[str, list[str] | list[float]]
# Per validation query: its text, the relevant documents' texts, the first-stage candidates' texts.
ValidationQuery = tuple[str, list[str], list[str]]

_EVALUATOR_NAME = "validation"
# The trainer prefixes "eval_" and the evaluator its own name to the evaluator's primary metric.
_BEST_METRIC = f"eval_{_EVALUATOR_NAME}_ndcg@10"
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_FINE_TUNE_LEARNING_RATE = 2e-5
_NEW_HEAD_LEARNING_RATE = 1e-4
_ALPHAS = tuple(step / 10 for step in range(11))
# Throughput is timed over whole passes of the validation pairs until this much time has passed,
# so a small validation set still gives a stable figure.
_MIN_THROUGHPUT_S = 1.0
# The judgments of the held-out queries, written beside the model for `sidecar eval --qrels`.
HELDOUT_QRELS = "heldout-qrels.tsv"
NEGATIVES_FILE = "negatives.json"
SPLITS_FILE = "splits.json"


@dataclass(frozen=True)
class FitOptions:
    """How a cross-encoder is trained, whatever it is trained on."""

    epochs: int = 1
    batch_size: int = 16
    learning_rate: float | None = None  # by the starting model: see train_cross_encoder
    max_length: int = 256  # tokens per pair
    seed: int = 13
    device: str = "auto"
    # Validate and checkpoint every N optimizer steps instead of after each epoch.
    checkpoint_steps: int | None = None
    resume: bool = False
    progress: bool = True


@dataclass(frozen=True)
class Distillation:
    """What a distilled student was distilled from, and the quality and speed it trades: both
    models measured in the same run, on the same validation pairs, machine and batch size."""

    teacher: str
    teacher_layers: int
    teacher_scored_pairs: int  # distinct (query, document) pairs behind the targets
    teacher_ndcg10: float
    teacher_pairs_per_s: float
    student_pairs_per_s: float
    throughput_pairs: int
    throughput_batch_size: int
    throughput_dtype: str  # what the serving backend ran both models in on this device


@dataclass(frozen=True)
class TrainingReport:
    """What a training run did and how well the result ranks the validation queries."""

    base: str  # the model training started from; the teacher when distilled
    out_dir: Path
    train_examples: int  # pairs, or triples when distilled
    train_queries: int
    validation_queries: int
    epochs: int
    learning_rate: float
    layers: int  # the written model's transformer layers
    ndcg10_before: float
    ndcg10_after: float
    seconds: float
    device: str
    precision: str
    model_bytes: int
    distillation: Distillation | None = None


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
    for query, relevant, negative in _judged_texts(queries, documents, qrels, negatives):
        examples.extend((query, text, 1.0) for text in relevant)
        examples.extend((query, text, 0.0) for text in negative)
    return examples


def build_triples(
    queries: Mapping[str, str],
    documents: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    negatives: Mapping[str, Sequence[str]],
) -> list[Triple]:
    """Distillation triples for the queries in `queries`, in their order: every combination of a
    judged-relevant document with one of the query's negatives, so each relevant document gets
    all of them (as many as `negatives` holds per query).

    The teacher's margin on each triple is the target, so the negatives need no judgment of their
    own; the same skipping and refusal rules as `build_examples` apply.
    """
    return [
        (query, positive, negative)
        for query, relevant, negatives_of_query in _judged_texts(
            queries, documents, qrels, negatives
        )
        for positive in relevant
        for negative in negatives_of_query
    ]


def _judged_texts(
    queries: Mapping[str, str],
    documents: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    negatives: Mapping[str, Sequence[str]],
) -> Iterator[tuple[str, list[str], list[str]]]:
    """Per query with a relevant document in `documents`: its text, the relevant texts and the
    negatives' texts. Raises ValueError for a negative that is judged relevant."""
    for query_id, query in queries.items():
        judged = qrels.get(query_id, {})
        relevant = [documents[doc] for doc, rel in judged.items() if rel > 0 and doc in documents]
        if not relevant:
            continue
        negative = []
        for doc in negatives.get(query_id, ()):
            if judged.get(doc, 0) > 0:
                raise ValueError(f"negative {doc!r} of query {query_id!r} is judged relevant")
            if doc in documents:
                negative.append(documents[doc])
        yield query, relevant, negative


def is_cross_encoder(source: str) -> bool:
    """Whether the model at `source` (local folder or Hub id) already is a cross-encoder, whose
    relevance head training keeps: a `*ForSequenceClassification` model, or a saved
    sentence-transformers CrossEncoder such as this module writes (encoder, pooling and a dense
    head, whose config names no classifier). A plain encoder is not.

    Raises ValueError when `source` is neither a folder nor a reachable Hub id.
    """
    from sentence_transformers.util import load_file_path

    from sidecar.rerank.backend import has_relevance_head

    try:
        if has_relevance_head(source):
            return True
        settings = load_file_path(source, "config_sentence_transformers.json")
    except OSError as error:
        raise ValueError(f"cannot load the model {source!r}: {error}") from None
    if settings is None:
        return False
    return bool(json.loads(Path(settings).read_text()).get("model_type") == "CrossEncoder")


def load_cross_encoder(source: str, *, max_length: int, device: str) -> tuple[Any, bool]:
    """The model at `source` as a single-logit CrossEncoder on `device`, and whether it was one
    already (`is_cross_encoder`): such a model is loaded as it is, a plain encoder gets a fresh
    seeded mean-pooling head (`cross_encoder_from_encoder`).

    Raises ValueError when `source` cannot be loaded or scores more than one label.
    """
    from sentence_transformers.cross_encoder import CrossEncoder

    from sidecar.rerank.backend import cross_encoder_from_encoder

    if not is_cross_encoder(source):
        return cross_encoder_from_encoder(source, max_length=max_length, device=device), False
    model = CrossEncoder(source, max_length=max_length, device=device)
    if model.num_labels != 1:
        raise ValueError(f"{source} scores {model.num_labels} labels; a reranker scores one")
    return model, True


def truncate_layers(transformer: Any, layers: int) -> int:
    """Keep only the first `layers` transformer layers of `transformer` (a transformers model:
    a CrossEncoder's `transformers_model`), in place, and set its config's `num_hidden_layers`;
    the embeddings and whatever sits on top (pooling and dense head, or the classifier) stay.
    Returns the depth it had.

    This is how a distilled student starts: from the teacher's embeddings, lower layers and
    trained relevance head, so it needs far less data than a fresh head on a shallow encoder.
    BERT-like encoders only, whose layers are the `encoder.layer` list (BERT, MiniLM, RoBERTa,
    XLM-R, ELECTRA), bare or under a `*ForSequenceClassification` head. Raises ValueError for
    other architectures and unless 1 <= `layers` < the depth.
    """
    import torch

    base = getattr(transformer, "base_model", transformer)
    encoder: Any = getattr(base, "encoder", None)
    stack = getattr(encoder, "layer", None)
    if not isinstance(stack, torch.nn.ModuleList):
        raise ValueError(
            f"cannot truncate a {type(base).__name__}: only BERT-like encoders, whose layers are "
            "encoder.layer, are supported"
        )
    check_layers(layers, len(stack))
    encoder.layer = stack[:layers]
    transformer.config.num_hidden_layers = layers
    return len(stack)


def check_layers(layers: int, depth: int) -> None:
    """Raises ValueError unless `layers` keeps at least one of a model's `depth` layers and drops
    at least one (keeping all of them is no truncation)."""
    if not 1 <= layers < depth:
        raise ValueError(
            f"layers must be in 1..{depth - 1} for a {depth}-layer model, got {layers}"
        )


def configured_layers(source: str) -> int:
    """The transformer depth the model at `source` declares in its config."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(source).num_hidden_layers)


def train_cross_encoder(
    base: str,
    train: Sequence[Example],
    validation: Mapping[str, ValidationQuery],
    out_dir: Path,
    options: FitOptions = FitOptions(),
    *,
    layers: int | None = None,
) -> TrainingReport:
    """Fine-tune `base` (a Hub id or local path) on `train` with binary cross-entropy and write the
    best model, by validation nDCG@10, to `out_dir`; `layers` first cuts `base` to its first N
    transformer layers (`truncate_layers`).

    A plain encoder as `base` (a bi-encoder, a base LM) gets a fresh mean-pooling head (seeded;
    `cross_encoder_from_encoder`), and by default a larger learning rate than a cross-encoder.
    Validation, checkpoints and resuming are `_fit`'s.

    Raises ValueError when `train` or `validation` is empty, when `base` cannot be loaded or cut
    to `layers`, or when `out_dir` holds an interrupted run's checkpoints and `options.resume` is
    not set (starting over would discard them).
    """
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    run = _start_run(len(train), validation, out_dir, options)
    model, had_head = load_cross_encoder(
        resolve_model_source(base), max_length=options.max_length, device=run.device
    )
    if layers is not None:
        truncate_layers(model.transformers_model, layers)
    columns: Columns = {
        "query": [query for query, _, _ in train],
        "document": [text for _, text, _ in train],
        "label": [float(label) for _, _, label in train],
    }
    # Fine-tuning a trained head takes small steps; a fresh head needs larger ones to move.
    default_rate = _FINE_TUNE_LEARNING_RATE if had_head else _NEW_HEAD_LEARNING_RATE
    evaluator = _reranking_evaluator(validation, options)
    return _fit(run, model, base, columns, BinaryCrossEntropyLoss, evaluator, default_rate, options)


def distill_cross_encoder(
    teacher: str,
    layers: int,
    train: Sequence[Triple],
    validation: Mapping[str, ValidationQuery],
    out_dir: Path,
    options: FitOptions = FitOptions(),
) -> TrainingReport:
    """Distil `teacher` (Hub id or local folder of a trained single-logit cross-encoder) into a
    student of its first `layers` layers (`truncate_layers`), trained on `train` to reproduce the
    teacher's raw logit margins, and write the best student, by validation nDCG@10, to `out_dir`.

    The loss is MarginMSE (Hofstätter et al. 2020, the usual one for cross-encoder distillation):
    the squared error between the student's and the teacher's s(q, positive) - s(q, negative).
    Margins rather than the logits themselves (MSELoss) leave the student free in the offset,
    which ranking ignores, and spend its capacity on what a ranking needs: the order and the gaps.
    The teacher scores every distinct pair once, batched, before training, and is then released;
    its validation nDCG@10 and both models' pairs/s through the serving backend, on the pairs the
    validation scores, go in the report's `distillation`.

    Raises ValueError as `train_cross_encoder` does, and when `teacher` is not a cross-encoder.
    """
    from sentence_transformers.cross_encoder.losses import MarginMSELoss

    run = _start_run(len(train), validation, out_dir, options)
    source = resolve_model_source(teacher)
    if not is_cross_encoder(source):
        raise ValueError(f"the teacher {teacher!r} is not a cross-encoder")
    teacher_model, _ = load_cross_encoder(source, max_length=options.max_length, device=run.device)
    student = copy.deepcopy(teacher_model)
    teacher_layers = truncate_layers(student.transformers_model, layers)
    margins, scored_pairs = score_margins(
        teacher_model, train, options.batch_size, options.progress
    )
    evaluator = _reranking_evaluator(validation, options)
    teacher_ndcg = _ndcg10(evaluator(teacher_model))
    del teacher_model  # its memory goes back before the student trains
    columns: Columns = {
        "query": [query for query, _, _ in train],
        "positive": [positive for _, positive, _ in train],
        "negative": [negative for _, _, negative in train],
        "label": margins,
    }
    # The student's head is the teacher's, trained: small steps, as for any fine-tuning.
    report = _fit(
        run, student, teacher, columns, MarginMSELoss, evaluator, _FINE_TUNE_LEARNING_RATE, options
    )
    pairs = [
        (query, text)
        for query, relevant, candidates in validation.values()
        for text in dict.fromkeys(relevant + candidates)
    ]
    teacher_speed = measure_throughput(source, pairs, options)
    student_speed = measure_throughput(str(out_dir), pairs, options)
    return dataclasses.replace(
        report,
        distillation=Distillation(
            teacher=teacher,
            teacher_layers=teacher_layers,
            teacher_scored_pairs=scored_pairs,
            teacher_ndcg10=teacher_ndcg,
            teacher_pairs_per_s=teacher_speed.pairs_per_s,
            student_pairs_per_s=student_speed.pairs_per_s,
            throughput_pairs=len(pairs),
            throughput_batch_size=options.batch_size,
            throughput_dtype=student_speed.dtype,
        ),
    )


def score_margins(
    teacher: Any, triples: Sequence[Triple], batch_size: int, progress: bool = True
) -> tuple[list[float], int]:
    """The teacher's raw logit margin s(q, positive) - s(q, negative) per triple, and how many
    distinct pairs it scored: each once, in batches of `batch_size`."""
    import torch

    pairs = list(
        dict.fromkeys(
            (q, text) for q, positive, negative in triples for text in (positive, negative)
        )
    )
    logits = teacher.predict(
        pairs,
        batch_size=batch_size,
        activation_fn=torch.nn.Identity(),
        convert_to_numpy=True,
        show_progress_bar=progress,
    )
    score = dict(zip(pairs, logits.astype(float).tolist(), strict=True))
    margins = [score[(q, positive)] - score[(q, negative)] for q, positive, negative in triples]
    return margins, len(pairs)


@dataclass(frozen=True)
class Throughput:
    """A model's measured scoring speed, and the dtype it was served in."""

    pairs_per_s: float
    dtype: str


def measure_throughput(
    model: str, pairs: Sequence[tuple[str, str]], options: FitOptions
) -> Throughput:
    """Pairs per second scoring `pairs` in batches of `options.batch_size` through the serving
    backend (`CrossEncoderBackend` with its defaults for the device), after one warm-up batch;
    whole passes are repeated until `_MIN_THROUGHPUT_S` has passed."""
    from sidecar.rerank.backend import CrossEncoderBackend, ScoringPair

    backend = CrossEncoderBackend(model, device=options.device, max_length=options.max_length)
    batches = [
        [ScoringPair(query, text, 0) for query, text in pairs[start : start + options.batch_size]]
        for start in range(0, len(pairs), options.batch_size)
    ]
    backend.score(batches[0])
    passes, started = 0, time.perf_counter()
    while passes == 0 or time.perf_counter() - started < _MIN_THROUGHPUT_S:
        for batch in batches:
            backend.score(batch)
        passes += 1
    return Throughput(passes * len(pairs) / (time.perf_counter() - started), backend.dtype)


@dataclass(frozen=True)
class _Run:
    """A training run's folders and device, settled before any model is loaded."""

    out_dir: Path
    checkpoints: Path
    interrupted: bool
    device: str
    started: float  # time.perf_counter()


def _start_run(
    train_examples: int,
    validation: Mapping[str, ValidationQuery],
    out_dir: Path,
    options: FitOptions,
) -> _Run:
    """Refuses an empty run or one that would start over on an interrupted run's checkpoints;
    seeds torch before any model is built, since a fresh head is random."""
    if not train_examples:
        raise ValueError("no training examples")
    if not validation:
        raise ValueError("no validation queries")
    checkpoints = out_dir / "checkpoints"
    interrupted = checkpoints.is_dir() and any(checkpoints.glob("checkpoint-*"))
    if interrupted and not options.resume:
        raise ValueError(
            f"{checkpoints} holds an interrupted run: resume it, or remove the folder to start over"
        )
    import transformers

    started = time.perf_counter()
    device = select_device(options.device)
    transformers.set_seed(options.seed)
    return _Run(out_dir, checkpoints, interrupted, device, started)


def _reranking_evaluator(validation: Mapping[str, ValidationQuery], options: FitOptions) -> Any:
    """nDCG@10 reranking each validation query's candidates with its relevant documents always
    included, so it measures the reranker alone, not first-stage recall."""
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator

    return CrossEncoderRerankingEvaluator(
        samples=[
            {"query": query, "positive": relevant, "documents": candidates}
            for query, relevant, candidates in validation.values()
        ],
        at_k=10,
        name=_EVALUATOR_NAME,
        batch_size=options.batch_size,
        show_progress_bar=options.progress,
        write_csv=False,
    )


def _fit(
    run: _Run,
    model: Any,
    base: str,
    columns: Columns,
    loss: Callable[[Any], Any],
    evaluator: Any,
    default_learning_rate: float,
    options: FitOptions,
) -> TrainingReport:
    """Train `model` on `columns` ("query" first) with `loss(model)`, starting at
    `options.learning_rate` or else `default_learning_rate`, and write the best model by
    `evaluator`'s nDCG@10 to `run.out_dir`.

    The model is evaluated and checkpointed in `out_dir/checkpoints` after each epoch, or every
    `checkpoint_steps` optimizer steps, so an interrupted run loses at most that much work and
    `resume` continues it from the last checkpoint (model, optimizer, scheduler and RNG states);
    the checkpoints are removed once the best model is written.
    """
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import (
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
    )

    on_cuda = run.device.startswith("cuda")
    learning_rate = options.learning_rate or default_learning_rate
    ndcg_before = _ndcg10(evaluator(model))
    # Mixed precision where the hardware computes it natively: bf16 on Ampere+ GPUs and on CPUs
    # with bf16 units (AMX, AVX512-BF16; about 1.5x the fp32 training speed there), else fp16 on
    # CUDA, else fp32. The saved weights stay fp32.
    if on_cuda:
        bf16 = torch.cuda.is_bf16_supported()
    else:
        bf16 = select_dtype("auto", run.device) == torch.bfloat16
    fp16 = on_cuda and not bf16
    steps = options.checkpoint_steps
    args = CrossEncoderTrainingArguments(
        output_dir=str(run.checkpoints),
        num_train_epochs=options.epochs,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size,
        learning_rate=learning_rate,
        warmup_steps=0.1,  # a float is a share of all steps
        seed=options.seed,
        data_seed=options.seed,
        bf16=bf16,
        fp16=fp16,
        use_cpu=not on_cuda,
        eval_strategy="steps" if steps else "epoch",
        save_strategy="steps" if steps else "epoch",
        eval_steps=steps,
        save_steps=steps or 500,  # used only with the "steps" strategy
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model=_BEST_METRIC,
        greater_is_better=True,
        logging_strategy="steps" if steps else "epoch",
        logging_steps=steps or 500,
        report_to="none",
        disable_tqdm=not options.progress,
        dataloader_pin_memory=on_cuda,
    )
    trainer = CrossEncoderTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict(dict(columns)),
        loss=loss(model),
        evaluator=evaluator,
    )
    if run.interrupted:
        log.info("resuming the interrupted run in %s", run.checkpoints)
    trainer.train(resume_from_checkpoint=run.interrupted or None)
    best: Any = trainer.model
    ndcg_after = _ndcg10(evaluator(best))
    # Our own model card (write_model_card) replaces the library's generated one.
    best.save_pretrained(str(run.out_dir), create_model_card=False)
    shutil.rmtree(run.checkpoints)
    return TrainingReport(
        base=base,
        out_dir=run.out_dir,
        train_examples=len(columns["label"]),
        train_queries=len(set(columns["query"])),
        validation_queries=len(evaluator.samples),
        epochs=options.epochs,
        learning_rate=learning_rate,
        layers=int(best.transformers_model.config.num_hidden_layers),
        ndcg10_before=ndcg_before,
        ndcg10_after=ndcg_after,
        seconds=time.perf_counter() - run.started,
        device=run.device,
        precision="bf16 mixed" if bf16 else "fp16 mixed" if fp16 else "fp32",
        model_bytes=sum(
            path.stat().st_size
            for path in run.out_dir.rglob("*")
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
    directory found later still says where it came from; a distilled model's card also sets its
    quality and speed beside the teacher's. Returns the file written."""
    card = report.out_dir / "README.md"
    distilled = report.distillation
    if distilled is None:
        title = f"fine-tuned from {report.base}"
        origin_rows = [
            f"| base model | `{report.base}` |",
            f"| transformer layers | {report.layers} |",
            f"| training pairs | {report.train_examples} |",
            "| loss | binary cross-entropy on the 1/0 labels |",
        ]
        before = "base"
    else:
        title = f"distilled from {distilled.teacher}"
        origin_rows = [
            f"| teacher | `{distilled.teacher}`, {distilled.teacher_layers} layers |",
            f"| transformer layers | {report.layers} (the teacher's first {report.layers}, its "
            "embeddings and relevance head) |",
            f"| training triples (query, relevant, negative) | {report.train_examples} |",
            f"| loss | MarginMSE on the teacher's logit margins "
            f"({distilled.teacher_scored_pairs} pairs scored) |",
        ]
        before = f"the teacher cut to {report.layers} layers"
    blend_rows = []
    if blend_choice is not None:
        blend_rows = [
            f"| recommended `SIDECAR_ALPHA` | {blend_choice.alpha:g} |",
            "| validation nDCG@10 over the first-stage candidates: first stage / reranker alone / "
            f"blend | {blend_choice.first_stage:.4f} / {blend_choice.reranker:.4f} / "
            f"{blend_choice.ndcg10:.4f} |",
        ]
    trade_rows = []
    if distilled is not None:
        speedup = distilled.student_pairs_per_s / distilled.teacher_pairs_per_s
        trade_rows = [
            "| validation nDCG@10: teacher / student | "
            f"{distilled.teacher_ndcg10:.4f} / {report.ndcg10_after:.4f} |",
            f"| pairs/s on the {distilled.throughput_pairs} validation pairs, batches of "
            f"{distilled.throughput_batch_size}, {report.device} {distilled.throughput_dtype}: "
            f"teacher / student | {distilled.teacher_pairs_per_s:.1f} / "
            f"{distilled.student_pairs_per_s:.1f} ({speedup:.2f}x) |",
        ]
    card.write_text(
        "\n".join(
            [
                f"# Cross-encoder reranker {title}",
                "",
                "A single-logit relevance cross-encoder for the sidecar's rerank stage; load it "
                f"with `SIDECAR_RERANKER_MODEL={report.out_dir}`.",
                "",
                "| | |",
                "|---|---|",
                *origin_rows,
                f"| data | {data_description} |",
                f"| training queries | {report.train_queries} |",
                f"| validation queries | {report.validation_queries} |",
                f"| epochs | {report.epochs} |",
                f"| learning rate | {report.learning_rate:g} |",
                f"| validation nDCG@10 before ({before}) | {report.ndcg10_before:.4f} |",
                f"| validation nDCG@10 after | {report.ndcg10_after:.4f} |",
                *trade_rows,
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
    # Per training query; distilling, per relevant document of it.
    negatives: int = 4
    # Distil this trained cross-encoder into a student of `layers` layers instead of fine-tuning
    # the base; without a teacher, `layers` cuts the base.
    teacher: str | None = None
    layers: int | None = None
    fit: FitOptions = FitOptions()
    # How the sidecar that will serve the model normalizes rerank scores, for the blend choice.
    normalization: Normalization = "sigmoid"


def check_start(base: str, options: TrainOptions) -> None:
    """Refuses, from the models' configs alone and so before any index load or mining, a teacher
    without the student's `layers`, a teacher that is not a cross-encoder, and `layers` that do
    not cut the model training starts from (`check_layers`). Raises ValueError."""
    start = resolve_model_source(options.teacher or base)
    if options.teacher is not None:
        if options.layers is None:
            raise ValueError("distilling needs the student's depth: layers")
        if not is_cross_encoder(start):
            raise ValueError(f"the teacher {options.teacher!r} is not a cross-encoder")
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
    blend weight on the validation queries, and write the model, its card, the split
    (splits.json), the mined negatives (negatives.json) and the held-out judgments.

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
        fit.progress,
    )
    wanted = {doc for ranked in candidates.values() for doc in ranked}
    wanted |= {doc for q in candidates for doc, rel in qrels[q].items() if rel > 0}
    documents = read_documents(dataset / "corpus.jsonl", wanted)
    negatives = mine_negatives(
        {q: list(candidates[q]) for q in train_ids}, qrels, options.negatives
    )
    # What each query was trained against, to audit the negatives later.
    (out_dir / NEGATIVES_FILE).write_text(json.dumps(negatives, indent=1) + "\n")
    validation: dict[str, ValidationQuery] = {}
    for query_id in validation_ids:
        relevant = [
            documents[d] for d, rel in qrels[query_id].items() if rel > 0 and d in documents
        ]
        if relevant:
            ranked = [documents[d] for d in candidates[query_id] if d in documents]
            validation[query_id] = (queries[query_id], relevant, ranked)
    train_queries = {q: queries[q] for q in train_ids}
    negatives_described = (
        f"the top {options.negatives} of {options.candidates} hybrid first-stage candidates "
        f"(index `{index}`) not judged relevant"
    )
    if options.teacher is not None and options.layers is not None:
        triples = build_triples(train_queries, documents, qrels, negatives)
        log.info("training triples: %d; validation queries: %d", len(triples), len(validation))
        report = distill_cross_encoder(
            options.teacher, options.layers, triples, validation, out_dir, fit
        )
        negatives_described = f"each relevant document against {negatives_described}"
    else:
        train = build_examples(train_queries, documents, qrels, negatives)
        log.info("training pairs: %d; validation queries: %d", len(train), len(validation))
        report = train_cross_encoder(base, train, validation, out_dir, fit, layers=options.layers)
    blend_choice = choose_alpha(
        score_candidates(
            out_dir,
            {q: queries[q] for q in validation},
            {q: candidates[q] for q in validation},
            documents,
            fit.device,
            fit.progress,
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
        f"`{qrels_path}` of `{dataset}`; negatives: {negatives_described}; {len(heldout)} "
        f"queries held out (`{HELDOUT_QRELS}`)"
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
