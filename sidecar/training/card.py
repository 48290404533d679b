"""The model card written beside a trained reranker's weights."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sidecar.rerank.final_scorer import FEATURES, SERVING_FILE, Serving
from sidecar.training.fit import TrainingReport


def write_model_card(
    report: TrainingReport,
    command: str,
    data_description: str,
    serving: tuple[Serving, Mapping[str, Any]] | None = None,
    pretraining: str | None = None,
    cross_fitting: str | None = None,
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
            *([f"| relevance head | {_HEADS[report.head]} |"] if report.head else []),
            f"| transformer layers | {report.layers} |",
            f"| training pairs | {report.train_examples} |",
            f"| loss | {_LOSSES[report.loss]} |",
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
    serving_rows, serving_text = _serving_rows(*serving) if serving is not None else ([], [])
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
                *([f"| pre-training on the corpus | {pretraining} |"] if pretraining else []),
                *([f"| cross-fitting | {cross_fitting} |"] if cross_fitting else []),
                *serving_rows,
                "",
                "Validation nDCG@10 before and after is the reranker alone over each validation "
                "query's first-stage candidates, as many as it serves.",
                *serving_text,
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


_LOSSES = {
    "bce": "binary cross-entropy on each pair's label",
    "listnet": "ListNet over each query's relevant documents and negatives",
    "lambda": "LambdaLoss (nDCG-weighted swaps) over each query's relevant documents and negatives",
}
_HEADS = {
    "segment-cosine": "new: cosine of the query's and the document's mean token states in the "
    "joint encoding, scaled to the training labels' log-odds before training",
    "mean-linear": "new: a linear layer on the mean of the pair's token states",
}


def _serving_rows(serving: Serving, figures: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The serving choices as card rows, and the per-depth validation table and the learned
    scorer's coefficients as text after the table."""
    rows = [
        f"| recommended `SIDECAR_ALPHA` (the blend) | {serving.alpha:g} |",
        f"| final scorer served (`{SERVING_FILE}`) | "
        + ("learned (logistic regression, below)" if serving.final_scorer else "the blend")
        + " |",
        f"| default rerank depth served | {serving.rerank_depth}"
        + ("" if serving.gained else " (no gain shown at any depth: the shallowest validated)")
        + " |",
        f"| depths whose validation gain's 95% CI is above 0 | "
        f"{', '.join(map(str, figures['positive_depths'])) or 'none'} |",
    ]
    text = [
        "",
        f"Validation nDCG@10 by rerank depth ({figures['queries']} queries; first stage "
        f"{figures['first_stage_ndcg10']:.4f}; both scorers judged out of fold, the blend at "
        "the weight chosen on the other folds, "
        f"{len(figures['depths'])} depths):",
        "",
        "| depth | blend nDCG@10 | gain (95% CI) | learned nDCG@10 | gain (95% CI) |",
        "|---|---|---|---|---|",
    ]
    for depth, entry in figures["depths"].items():
        cells = [
            f"{entry[name]['ndcg10']:.4f} | {entry[name]['gain']['mean']:+.4f} "
            f"({entry[name]['gain']['ci95'][0]:+.4f} to {entry[name]['gain']['ci95'][1]:+.4f})"
            for name in ("blend", "learned")
        ]
        text.append(f"| {depth} | {cells[0]} | {cells[1]} |")
    if serving.final_scorer is not None:
        text += [
            "",
            "Learned final scorer: p = sigmoid(sum of coefficient x standardized feature + "
            f"{serving.final_scorer.intercept:.3f}); coefficients (per standard deviation):",
            "",
            "| feature | coefficient |",
            "|---|---|",
            *(
                f"| {name} | {value:+.3f} |"
                for name, value in zip(FEATURES, serving.final_scorer.coefficients, strict=True)
            ),
        ]
    return rows, text
