"""Training a cross-encoder with sentence-transformers' CrossEncoderTrainer: fine-tuning on
labelled pairs or lists, distilling a teacher into a shallower student, validating and keeping
the best checkpoint, and timing a model through the serving backend."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sidecar.device import select_device, select_dtype
from sidecar.embedding import resolve_model_source
from sidecar.training.data import Columns, Example, Triple, ValidationQuery

if TYPE_CHECKING:  # the heads module imports torch, which only training needs
    from sidecar.rerank.heads import Head

log = logging.getLogger(__name__)

# What a fine-tune minimizes: binary cross-entropy on each pair's 1/0 label, or a listwise loss
# over each query's relevant documents and its negatives together (ListNet; LambdaLoss, which
# weighs each swap by its nDCG change).
Loss = Literal["bce", "listnet", "lambda"]
LOSSES: tuple[Loss, ...] = ("bce", "listnet", "lambda")

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
    loss: Loss = "bce"
    # Stop after this many validations without a better nDCG@10 (None: run every epoch).
    early_stopping_patience: int | None = None
    # The head a plain encoder gets (`sidecar.rerank.heads`); a cross-encoder keeps its own.
    head: Head = "segment-cosine"


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
    loss: Loss = "bce"  # a fine-tune's; a distilled student's is MarginMSE
    distillation: Distillation | None = None
    head: Head | None = None  # the fresh head a plain encoder got; None: the base's own


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


def load_cross_encoder(
    source: str, *, max_length: int, device: str, head: Head = "mean-linear"
) -> tuple[Any, bool]:
    """The model at `source` as a single-logit CrossEncoder on `device`, and whether it was one
    already (`is_cross_encoder`): such a model is loaded as it is, a plain encoder gets a fresh
    seeded `head` (`cross_encoder_from_encoder`).

    Raises ValueError when `source` cannot be loaded or scores more than one label.
    """
    from sidecar.rerank import heads

    if not is_cross_encoder(source):
        model = heads.cross_encoder_from_encoder(
            source, head=head, max_length=max_length, device=device
        )
        return model, False
    model = heads.load_saved_cross_encoder(source, max_length=max_length, device=device)
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
    ndcg10_before: float | None = None,
) -> TrainingReport:
    """Fine-tune `base` (a Hub id or local path) on `train` with `options.loss` and write the
    best model, by validation nDCG@10, to `out_dir`; `layers` first cuts `base` to its first N
    transformer layers (`truncate_layers`). `ndcg10_before` is `base`'s validation nDCG@10 on
    these same queries when already measured (a pre-trained start), sparing a validation pass.

    A plain encoder as `base` (a bi-encoder, a base LM) gets a fresh `options.head` (seeded;
    `cross_encoder_from_encoder`; a segment-cosine head is scaled to `train`'s labels first),
    and by default a larger learning rate than a cross-encoder.
    The listwise losses read each query's pairs as one list, in the order given. Validation,
    early stopping, checkpoints and resuming are `_fit`'s.

    Raises ValueError when `train` or `validation` is empty, when `base` cannot be loaded or cut
    to `layers`, or when `out_dir` holds an interrupted run's checkpoints and `options.resume` is
    not set (starting over would discard them).
    """
    from sidecar.rerank.heads import calibrate_head

    run = _start_run(len(train), validation, out_dir, options)
    model, had_head = load_cross_encoder(
        resolve_model_source(base),
        max_length=options.max_length,
        device=run.device,
        head=options.head,
    )
    if layers is not None:
        truncate_layers(model.transformers_model, layers)
    if not had_head:
        calibrate_head(model, train, options.seed)
    # Fine-tuning a trained head takes small steps; a fresh head needs larger ones to move (the
    # segment-cosine head too: on Cranfield's validation queries, 1e-4 gave the larger gain of
    # the final scorers over the first stage, 2e-5 the better reranker alone).
    default_rate = _FINE_TUNE_LEARNING_RATE if had_head else _NEW_HEAD_LEARNING_RATE
    evaluator = _reranking_evaluator(validation, options, run.device)
    columns, loss = _loss_inputs(train, options.loss)
    if options.loss != "bce":
        # A batch holds lists, not pairs: as many lists as keep it near `batch_size` pairs, or a
        # query with many judged documents fills memory (a Cranfield run with 16 lists: 20 GB).
        mean_list = len(train) / len(columns["query"])
        options = dataclasses.replace(
            options, batch_size=max(1, round(options.batch_size / mean_list))
        )
    report = _fit(run, model, base, columns, loss, evaluator, default_rate, options, ndcg10_before)
    return report if had_head else dataclasses.replace(report, head=options.head)


def _loss_inputs(train: Sequence[Example], loss: Loss) -> tuple[Columns, Callable[[Any], Any]]:
    """The trainer's columns for `loss` and the library's loss class."""
    from sentence_transformers.cross_encoder import losses

    if loss == "bce":
        columns: Columns = {
            "query": [query for query, _, _ in train],
            "document": [text for _, text, _ in train],
            "label": [float(label) for _, _, label in train],
        }
        return columns, losses.BinaryCrossEntropyLoss
    lists: dict[str, tuple[list[str], list[float]]] = {}
    for query, text, label in train:
        texts, labels = lists.setdefault(query, ([], []))
        texts.append(text)
        labels.append(float(label))
    columns = {
        "query": list(lists),
        "docs": [texts for texts, _ in lists.values()],
        "labels": [labels for _, labels in lists.values()],
    }
    if loss == "listnet":
        return columns, losses.ListNetLoss
    if loss == "lambda":
        return columns, losses.LambdaLoss
    raise ValueError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")


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
    evaluator = _reranking_evaluator(validation, options, run.device)
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


def _reranking_evaluator(
    validation: Mapping[str, ValidationQuery], options: FitOptions, device: str
) -> Any:
    """nDCG@10 of the reranker alone over each validation query's first-stage candidates, as many
    as the model will serve (the recipe cuts them to that depth): a relevant document the first
    stage missed counts as missed, as it does in serving. Scored in the precision the serving
    backend computes in on `device` (bf16 on CPUs with bf16 units, about 3x fp32's speed)."""
    import torch
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator

    dtype = select_dtype("auto", device)

    class MixedPrecisionEvaluator(CrossEncoderRerankingEvaluator):
        def __call__(self, *args: Any, **kwargs: Any) -> dict[str, float]:
            with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
                return dict(super().__call__(*args, **kwargs))

    return MixedPrecisionEvaluator(
        samples=[
            {"query": query, "positive": relevant, "documents": candidates}
            for query, relevant, candidates in validation.values()
        ],
        at_k=10,
        always_rerank_positives=False,
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
    ndcg_before: float | None = None,
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
    from transformers import EarlyStoppingCallback

    on_cuda = run.device.startswith("cuda")
    learning_rate = options.learning_rate or default_learning_rate
    if ndcg_before is None:
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
        callbacks=(
            [EarlyStoppingCallback(options.early_stopping_patience)]
            if options.early_stopping_patience
            else None
        ),
    )
    if run.interrupted:
        log.info("resuming the interrupted run in %s", run.checkpoints)
    trainer.train(resume_from_checkpoint=run.interrupted or None)
    best: Any = trainer.model
    # The best checkpoint's own validation (the trainer loaded that model back), unless training
    # was too short to reach a validation step.
    best_metric = trainer.state.best_metric
    ndcg_after = _ndcg10(evaluator(best)) if best_metric is None else float(best_metric)
    # Our own model card (write_model_card) replaces the library's generated one.
    best.save_pretrained(str(run.out_dir), create_model_card=False)
    shutil.rmtree(run.checkpoints)
    return TrainingReport(
        base=base,
        out_dir=run.out_dir,
        train_examples=(
            len(columns["label"]) if "label" in columns else sum(map(len, columns["labels"]))
        ),
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
        loss=options.loss,
        model_bytes=sum(
            path.stat().st_size
            for path in run.out_dir.rglob("*")
            if path.is_file() and path.name.endswith(_WEIGHT_SUFFIXES)
        ),
    )


def _ndcg10(metrics: Mapping[str, Any]) -> float:
    return float(metrics[f"{_EVALUATOR_NAME}_ndcg@10"])
