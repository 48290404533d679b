"""Cross-fitting: the serving choices fitted on every judged query instead of the validation share.

A fold model is trained for each of K folds of the train and validation queries on the other
folds, and scores its own fold's candidates, which it never saw: every query gets logits out of
fold, so the final scorer and the rerank depth are chosen on all of them (a few dozen validation
queries leave intervals too wide to choose by). The model served is then trained on all of them,
the recipe unchanged, so its logits are the fold models' with a fifth more data behind them."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sidecar.training import DEFAULT_FOLDS, FEW_VALIDATION_QUERIES
from sidecar.training.data import Candidates, Example, ValidationQuery, query_folds
from sidecar.training.fit import FitOptions, TrainingReport, train_cross_encoder
from sidecar.training.selection import ScoredQuery, score_candidates

log = logging.getLogger(__name__)

# Under OUT while the fold models exist; each is removed once it has scored its fold.
FOLDS_FOLDER = "folds"


def check_cross_fit(folds: int, fit: FitOptions) -> None:
    """Refuses fewer than two folds, and a schedule that would choose a fold model's checkpoint on
    the fold it then scores (several epochs with early stopping, or step checkpoints): its logits
    would be in sample. Raises ValueError."""
    if folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
    if fit.epochs > 1 or fit.checkpoint_steps is not None or fit.early_stopping_patience:
        raise ValueError(
            "cross-fitting trains each model for one epoch, with no checkpoint chosen: a "
            "checkpoint chosen on the fold a model then scores would leave its logits in sample"
        )


def default_folds(validation_queries: int, usable_queries: int, fit: FitOptions) -> int:
    """The folds a fine-tune cross-fits in when none are asked for: DEFAULT_FOLDS, at most one
    per usable query, when the validation share would hold fewer than FEW_VALIDATION_QUERIES and
    the schedule can be cross-fitted (`check_cross_fit`); else 0, the validation share as it is."""
    folds = min(DEFAULT_FOLDS, usable_queries)
    if validation_queries >= FEW_VALIDATION_QUERIES or folds < 2:
        return 0
    try:
        check_cross_fit(folds, fit)
    except ValueError:
        return 0
    return folds


@dataclass(frozen=True)
class CrossFit:
    """The served model's report, with the reranker-alone figures out of fold; every query's
    out-of-fold scored candidates; and the card's description of what was done."""

    report: TrainingReport
    scored: dict[str, ScoredQuery]
    description: str


def cross_fit_reranker(
    start: str,
    queries: Mapping[str, str],
    train_all: Sequence[Example],
    judged: Mapping[str, ValidationQuery],
    candidates: Candidates,
    documents: Mapping[str, str],
    pairs_of: Callable[[Mapping[str, str]], list[Example]],
    out_dir: Path,
    folds: int,
    fit: FitOptions,
    layers: int | None = None,
) -> CrossFit:
    """Train a fold model on the pairs (`pairs_of`, the recipe's pair builder) of the queries of
    `queries` outside each of `folds` folds of `judged` and score that fold's candidates with it,
    then train the model served on `train_all` (the pairs of all of `queries`) into `out_dir`.
    Raises ValueError when there are fewer judged queries than folds."""
    check_cross_fit(folds, fit)
    dealt = query_folds(list(judged), folds, fit.seed)
    if len(dealt) < folds:
        raise ValueError(f"{len(judged)} judged queries cannot fill {folds} folds")
    started = time.perf_counter()
    scored: dict[str, ScoredQuery] = {}
    reports: list[TrainingReport] = []
    for number, fold in enumerate(dealt, start=1):
        held = set(fold)
        train = pairs_of({q: text for q, text in queries.items() if q not in held})
        log.info(
            "fold %d of %d: %d training pairs; %d queries scored out of fold",
            number,
            folds,
            len(train),
            len(fold),
        )
        fold_dir = out_dir / FOLDS_FOLDER / str(number)
        reports.append(
            train_cross_encoder(
                start, train, {q: judged[q] for q in fold}, fold_dir, fit, layers=layers
            )
        )
        scored |= score_candidates(
            fold_dir,
            {q: judged[q][0] for q in fold},
            {q: candidates[q] for q in fold},
            documents,
            fit.device,
            fit.progress,
        )
        shutil.rmtree(fold_dir)
    shutil.rmtree(out_dir / FOLDS_FOLDER)
    before, after = (
        sum(getattr(r, figure) * r.validation_queries for r in reports) / len(judged)
        for figure in ("ndcg10_before", "ndcg10_after")
    )
    log.info("the model served: %d training pairs, every judged query", len(train_all))
    # Validated on the first fold only for the trainer's one end-of-epoch pass: nothing is chosen
    # on it, and the card's figures are the fold models', out of fold.
    served = train_cross_encoder(
        start,
        train_all,
        {q: judged[q] for q in dealt[0]},
        out_dir,
        fit,
        layers=layers,
        ndcg10_before=before,
    )
    report = dataclasses.replace(
        served,
        validation_queries=len(judged),
        ndcg10_before=before,
        ndcg10_after=after,
        seconds=time.perf_counter() - started,
    )
    description = (
        f"{folds} fold models, each trained on the other folds' queries (about "
        f"{round(len(judged) * (folds - 1) / folds)}) and scoring its own fold: the validation "
        f"figures and the serving choices are out of fold over all {len(judged)} queries; the "
        f"model served is trained on all of them"
    )
    return CrossFit(report, scored, description)
