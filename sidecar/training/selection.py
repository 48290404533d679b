"""How a trained reranker is served, chosen on the validation queries alone: the blend weight, a
learned final scorer over the rerank logit and first-stage signals, and the rerank depth it gains
at. Every final order is built as the sidecar builds it: the first `depth` candidates by final
score, the rest below them in first-stage order."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sidecar.evaluation import Qrels, Run, knee_depth, paired_gain, per_query_ndcg
from sidecar.rerank.final_scorer import LearnedScorer, Serving, Signals, feature_rows
from sidecar.scoring import FloatArray, best_first, blend, minmax_first_stage, normalize_scores
from sidecar.training.data import Candidates, query_folds

log = logging.getLogger(__name__)

# The rerank depths validated, as the sidecar's depth sweep and the model card report them.
DEPTHS = (20, 50, 100)
_ALPHAS = tuple(step / 10 for step in range(11))
# Inverse regularization strengths tried for the learned scorer, by grouped cross-validation.
_REGULARIZATION = (0.01, 0.1, 1.0, 10.0)
_FOLDS = 5


@dataclass(frozen=True)
class ScoredQuery:
    """One validation query's first-stage candidates (best first) with the reranker's logits."""

    ids: list[str]
    signals: list[Signals]
    logits: list[float]


# A final scorer for the first `depth` candidates of one query (id, candidates): their scores.
FinalScores = Callable[[str, ScoredQuery, int], Sequence[float]]


def score_candidates(
    model_dir: Path,
    queries: Mapping[str, str],
    candidates: Candidates,
    documents: Mapping[str, str],
    device: str = "auto",
    progress: bool = True,
) -> dict[str, ScoredQuery]:
    """Each query's candidates scored by the model in `model_dir` through the serving backend
    (same device, dtype and truncation as `sidecar serve`)."""
    from sidecar.rerank.backend import CrossEncoderBackend, ScoringPair

    backend = CrossEncoderBackend(str(model_dir), device=device)
    scored: dict[str, ScoredQuery] = {}
    for query_id, query in tqdm(
        queries.items(), desc="scoring validation", unit="query", disable=not progress
    ):
        ids = [doc for doc in candidates[query_id] if doc in documents]
        if not ids:
            continue
        logits = backend.score([ScoringPair(query, documents[doc], 0) for doc in ids])
        signals = [candidates[query_id][doc].signals(documents[doc]) for doc in ids]
        scored[query_id] = ScoredQuery(ids, signals, list(logits))
    return scored


def final_run(scored: Mapping[str, ScoredQuery], depth: int, final: FinalScores) -> Run:
    """Each query's final order as a run: the first `depth` candidates by `final`, ties in
    first-stage order, then the rest in first-stage order."""
    run: Run = {}
    for query_id, query in scored.items():
        within = min(depth, len(query.ids))
        order = [position for position, _ in best_first(final(query_id, query, within))]
        order += range(within, len(query.ids))
        run[query_id] = {query.ids[p]: float(len(order) - rank) for rank, p in enumerate(order)}
    return run


def _validation_ndcg(qrels: Qrels, run: Run) -> dict[str, float]:
    """nDCG@10 of each query of `run`: the judgments file also judges the training and held-out
    queries, which were not scored here and must not count as misses."""
    return per_query_ndcg({q: qrels[q] for q in run if q in qrels}, run)


def blend_scores(alpha: float, normalization: Any) -> FinalScores:
    """The sidecar's blend of the normalized logit with the min-max first-stage score, the
    first-stage score normalized over every candidate as serving does."""

    def scores(_: str, query: ScoredQuery, depth: int) -> list[float]:
        first_stage = minmax_first_stage([s.fused_score for s in query.signals])
        return blend(
            normalize_scores(query.logits[:depth], normalization), first_stage[:depth], alpha
        )

    return scores


def learned_scores(scorer: LearnedScorer) -> FinalScores:
    def scores(_: str, query: ScoredQuery, depth: int) -> list[float]:
        return scorer.score(feature_rows(query.signals, range(depth), query.logits[:depth]))

    return scores


def _replay(scores_by_query: Mapping[str, Sequence[float]]) -> FinalScores:
    """Final scores computed before (out of fold), looked up by query id."""

    def scores(query_id: str, _: ScoredQuery, depth: int) -> Sequence[float]:
        return scores_by_query[query_id][:depth]

    return scores


@dataclass(frozen=True)
class BlendChoice:
    """The `SIDECAR_ALPHA` that ranks the validation queries' candidates best at the serving
    depth, with the validation nDCG@10 it gives and the two ends it was chosen between."""

    alpha: float
    ndcg10: float
    first_stage: float  # alpha 0
    reranker: float  # alpha 1


def choose_alpha(
    scored: Mapping[str, ScoredQuery], qrels: Qrels, normalization: Any, depth: int
) -> BlendChoice:
    """The blend weight in 0, 0.1, ..., 1 with the best mean nDCG@10 over the validation queries,
    reranking their first `depth` candidates as the sidecar does; on a tie the larger weight (more
    reranker). A reranker that knows less than the first stage gets a small weight, or 0."""
    by_alpha = {
        alpha: _mean(
            _validation_ndcg(qrels, final_run(scored, depth, blend_scores(alpha, normalization)))
        )
        for alpha in _ALPHAS
    }
    best = max(reversed(_ALPHAS), key=lambda alpha: by_alpha[alpha])
    return BlendChoice(best, by_alpha[best], by_alpha[0.0], by_alpha[1.0])


@dataclass(frozen=True)
class LearnedFit:
    """The learned final scorer fitted on every validation query, its regularization chosen by
    grouped cross-validation, and each query's out-of-fold final scores (by depth), which judge
    it on queries it was not fitted on."""

    scorer: LearnedScorer
    regularization: float
    out_of_fold: dict[int, dict[str, Sequence[float]]]  # depth -> query -> final scores


def fit_learned_scorer(
    scored: Mapping[str, ScoredQuery], qrels: Qrels, depths: Sequence[int], seed: int
) -> LearnedFit:
    """A logistic regression (scikit-learn) on every validation candidate within the largest of
    `depths`, labelled judged relevant or not. The regularization is the one whose out-of-fold
    nDCG@10 at that depth is best, over `_FOLDS` folds of whole queries (seeded), so a query's
    candidates are never both fitted on and judged."""
    deepest = max(depths)
    best: tuple[float, float, dict[int, dict[str, Sequence[float]]]] | None = None
    for strength in _REGULARIZATION:
        out_of_fold = _out_of_fold(scored, depths, seed, _learned_fitter(qrels, deepest, strength))
        quality = _mean(
            _validation_ndcg(qrels, final_run(scored, deepest, _replay(out_of_fold[deepest])))
        )
        if best is None or quality > best[0]:
            best = (quality, strength, out_of_fold)
    assert best is not None  # _REGULARIZATION is not empty
    _, strength, out_of_fold = best
    return LearnedFit(_fit_logistic(scored, qrels, deepest, strength), strength, out_of_fold)


def _learned_fitter(
    qrels: Qrels, depth: int, strength: float
) -> Callable[[Mapping[str, ScoredQuery]], FinalScores]:
    """Fits the learned scorer at one regularization strength, bound here rather than in a loop."""
    return lambda fitted: learned_scores(_fit_logistic(fitted, qrels, depth, strength))


def blend_out_of_fold(
    scored: Mapping[str, ScoredQuery],
    qrels: Qrels,
    normalization: Any,
    depths: Sequence[int],
    seed: int,
) -> dict[int, dict[str, Sequence[float]]]:
    """Each query's blend scores by depth at the alpha chosen on the other folds (at the largest
    depth): the blend judged as the learned scorer is, on queries its weight was not chosen on.
    A weight chosen and judged on the same few dozen queries overstates its gain."""
    deepest = max(depths)
    return _out_of_fold(
        scored,
        depths,
        seed,
        lambda fitted: blend_scores(
            choose_alpha(fitted, qrels, normalization, deepest).alpha, normalization
        ),
    )


def _out_of_fold(
    scored: Mapping[str, ScoredQuery],
    depths: Sequence[int],
    seed: int,
    fit: Callable[[Mapping[str, ScoredQuery]], FinalScores],
) -> dict[int, dict[str, Sequence[float]]]:
    """Depth to query to final scores, each query scored by what `fit` made of the queries of the
    other `_FOLDS` folds (whole queries, by a seeded shuffle of the sorted ids)."""
    out_of_fold: dict[int, dict[str, Sequence[float]]] = {depth: {} for depth in depths}
    for fold in query_folds(list(scored), _FOLDS, seed):
        held = set(fold)
        final = fit({q: query for q, query in scored.items() if q not in held})
        for depth in depths:
            for query_id in fold:
                out_of_fold[depth][query_id] = final(
                    query_id, scored[query_id], min(depth, len(scored[query_id].ids))
                )
    return out_of_fold


def _fit_logistic(
    scored: Mapping[str, ScoredQuery], qrels: Qrels, depth: int, strength: float
) -> LearnedScorer:
    from sklearn.linear_model import LogisticRegression

    rows: list[FloatArray] = []
    labels: list[int] = []
    for query_id, query in scored.items():
        within = min(depth, len(query.ids))
        rows.append(feature_rows(query.signals, range(within), query.logits[:within]))
        judged = qrels.get(query_id, {})
        labels += [int(judged.get(doc, 0) > 0) for doc in query.ids[:within]]
    features = np.vstack(rows)
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale[scale == 0.0] = 1.0
    if len(set(labels)) < 2:
        raise ValueError("the validation candidates need both relevant and other documents")
    model = LogisticRegression(C=strength, max_iter=1000).fit((features - mean) / scale, labels)
    return LearnedScorer(
        tuple(mean.tolist()),
        tuple(scale.tolist()),
        tuple(model.coef_[0].tolist()),
        float(model.intercept_[0]),
    )


def choose_serving(
    scored: Mapping[str, ScoredQuery],
    qrels: Qrels,
    normalization: Any,
    depths: Sequence[int],
    seed: int,
) -> tuple[Serving, dict[str, Any]]:
    """The serving choices, and the validation figures they rest on: at each depth, nDCG@10 of
    the first stage, the blend and the learned scorer, both judged out of fold, each gain over the
    first stage with its paired 95% CI. The learned scorer is served when its gain is surer at the
    largest depth (`surer_scorer`); the blend served has the alpha chosen on every validation
    query. A gain is shown at the depths whose CI lies above 0; where one is, the recorded rerank
    depth is the chosen scorer's knee (the shallowest depth with 90% of its largest gain), else
    the shallowest depth: where a reranker not shown to help costs and changes the least, and
    `gained` is false (a mean gain whose interval spans 0 is no gain shown)."""
    deepest = max(depths)
    blend_choice = choose_alpha(scored, qrels, normalization, deepest)
    blend_judged = blend_out_of_fold(scored, qrels, normalization, depths, seed)
    fit = fit_learned_scorer(scored, qrels, depths, seed)
    first_stage = _validation_ndcg(qrels, final_run(scored, 0, blend_scores(0.0, normalization)))
    figures: dict[str, Any] = {"queries": len(scored), "first_stage_ndcg10": _mean(first_stage)}
    by_depth: dict[str, Any] = {}
    for depth in depths:
        runs = {
            "blend": final_run(scored, depth, _replay(blend_judged[depth])),
            "learned": final_run(scored, depth, _replay(fit.out_of_fold[depth])),
        }
        by_depth[str(depth)] = {
            name: {
                "ndcg10": _mean(ndcg := _validation_ndcg(qrels, run)),
                "gain": _gain_summary(paired_gain(first_stage, ndcg)),
            }
            for name, run in runs.items()
        }
    chosen = surer_scorer(by_depth[str(deepest)])
    learned_wins = chosen == "learned"
    gains = {depth: by_depth[str(depth)][chosen]["gain"]["mean"] for depth in depths}
    positive_depths = [
        depth for depth in depths if by_depth[str(depth)][chosen]["gain"]["ci95"][0] > 0
    ]
    knee = knee_depth(gains) if positive_depths else None
    figures.update(
        {
            "alpha": blend_choice.alpha,
            "reranker_alone_ndcg10": blend_choice.reranker,
            "learned_regularization": fit.regularization,
            "depths": by_depth,
            "final_scorer": chosen,
            "positive_depths": positive_depths,
        }
    )
    if knee is None:
        log.warning(
            "no rerank depth's gain on the validation queries has its 95%% CI above 0: "
            "recording the shallowest, %d",
            min(depths),
        )
    serving = Serving(
        rerank_depth=min(depths) if knee is None else knee,
        final_scorer=fit.scorer if learned_wins else None,
        alpha=blend_choice.alpha,
        gained=knee is not None,
    )
    return serving, figures


def surer_scorer(entry: Mapping[str, Any]) -> str:
    """Of the blend and the learned scorer (`entry`: name to its nDCG@10 and gain summary at one
    depth), the one whose gain's CI reaches lower; the blend on a tie. The surer gain, not the
    larger mean: a few dozen validation queries leave wide intervals, and the scorer is served to
    queries it has not seen."""
    lower = {name: entry[name]["gain"]["ci95"][0] for name in ("blend", "learned")}
    return "learned" if lower["learned"] > lower["blend"] else "blend"


def _gain_summary(gain: Mapping[str, Any]) -> dict[str, Any]:
    return {key: gain[key] for key in ("mean", "ci95", "wins", "ties", "losses")}


def _mean(values: Mapping[str, float]) -> float:
    return float(np.mean(list(values.values()))) if values else 0.0
