"""Command line: `serve`, the local dev cluster (`opensearch up|down|status`), `index create|load`,
and the offline tools around the serving path: `bench`, `soak`, `provenance`, `eval`,
`train-reranker`, `demo`. Each handler parses, delegates to its module, and prints."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args
from urllib.parse import urlparse

# Only light modules here: torch, sentence-transformers, scipy and opensearch-py are imported by
# the handlers that need them, so that commands without a model start at once.
from sidecar.config import DEFAULT_EMBEDDING_MODEL, Settings, Truncation
from sidecar.local_opensearch.node import LocalNode, NodeStatus
from sidecar.printed_commands import shown_path, sidecar_command
from sidecar.retrieval.identity import basic_authorization
from sidecar.training import DEFAULT_FOLDS, FEW_VALIDATION_QUERIES, HELDOUT_QRELS

if TYPE_CHECKING:
    from opensearchpy import OpenSearch

    from sidecar.indexing.templates import VectorOptions

log = logging.getLogger("sidecar")

# `--model-bench` sections: the reranker's own figures, and the stage-2 configuration grid.
MODEL_SECTIONS = ("reranker", "grid")
# Queries the grid times when no judgments name them.
GRID_QUERIES = 20
# The rerank depths `train-reranker` suggests evaluating a new model at (as its card reports).
_DEPTH_SWEEP = "20,50,100"


def _user_errors() -> tuple[type[Exception], ...]:
    """Failures that the user can act on: printed as one line, exit code 1, no traceback.
    Imported only once a command has failed (opensearch-py alone takes half a second)."""
    from opensearchpy.exceptions import OpenSearchException

    from sidecar.config import SettingsError
    from sidecar.evaluation import EvalError
    from sidecar.indexing.corpus import CorpusError
    from sidecar.indexing.loader import LoadError
    from sidecar.indexing.templates import IndexLayoutError
    from sidecar.local_opensearch.artifacts import DownloadError
    from sidecar.local_opensearch.java import JavaError
    from sidecar.local_opensearch.node import NodeError
    from sidecar.pass_through_bench import PassThroughBenchError
    from sidecar.provenance import ProvenanceError

    return (
        SettingsError,
        DownloadError,
        JavaError,
        NodeError,
        CorpusError,
        LoadError,
        IndexLayoutError,
        OpenSearchException,
        ProvenanceError,
        PassThroughBenchError,
        EvalError,
        ValueError,
        FileNotFoundError,
    )


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # opensearch-py logs every request at INFO; the bulk loader would drown its own progress bar.
    logging.getLogger("opensearch").setLevel(logging.WARNING)
    parser = _build_parser()
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["sidecar", *(sys.argv[1:] if argv is None else argv)])
    try:
        settings = Settings.from_env(os.environ)
        if getattr(args, "opensearch_url", None):
            settings = dataclasses.replace(settings, opensearch_url=args.opensearch_url)
        if getattr(args, "port", None):
            node = dataclasses.replace(settings.local_node, port=args.port)
            settings = dataclasses.replace(settings, local_node=node)
        if getattr(args, "secure", False):
            node = dataclasses.replace(settings.local_node, secure=True)
            settings = dataclasses.replace(settings, local_node=node)
        result: int = args.handler(args, settings)
        return result
    except Exception as error:
        if not isinstance(error, _user_errors()):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the sidecar (configured by SIDECAR_* variables)")
    serve.add_argument("--listen-port", type=int, help="default: SIDECAR_LISTEN_PORT or 8080")
    _add_opensearch_url(serve, "upstream OpenSearch URL")
    serve.set_defaults(handler=_serve)

    opensearch = commands.add_parser("opensearch", help="the project-managed local OpenSearch node")
    actions = opensearch.add_subparsers(required=True, metavar="ACTION")
    for name, handler, text in (
        ("up", _opensearch_up, "download, install and start (idempotent)"),
        ("down", _opensearch_down, "stop"),
        ("status", _opensearch_status, "print state as JSON"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument(
            "--port", type=int, help="HTTP port (default: SIDECAR_OPENSEARCH_PORT or 9200)"
        )
        action.add_argument(
            "--secure",
            action="store_true",
            help="the security-plugin node: HTTPS, demo certificates, an admin password "
            "(default: SIDECAR_OPENSEARCH_SECURE)",
        )
        action.add_argument(
            "--version",
            dest="opensearch_version",
            help="OpenSearch X.Y.Z, or auto: the newest one an available Java runs; an installed "
            "node keeps its own unless one is named (default: SIDECAR_OPENSEARCH_VERSION or auto)",
        )
        action.set_defaults(handler=handler)
        if name == "down":
            action.add_argument(
                "--purge",
                action="store_true",
                help="also delete the node's home: install, data and logs (the downloads in "
                "SIDECAR_CACHE_DIR are kept)",
            )

    index = commands.add_parser("index", help="create and fill hybrid indices")
    index_actions = index.add_subparsers(required=True, metavar="ACTION")
    create = index_actions.add_parser(
        "create", help="apply the index template and search pipelines"
    )
    load = index_actions.add_parser("load", help="embed and bulk-index a BEIR corpus.jsonl")
    for action in (create, load):
        action.add_argument("--index", required=True, help="index name")
        _add_opensearch_url(action, "OpenSearch URL")
        action.add_argument(
            "--replicas",
            type=int,
            help="replicas of a new index (default: 0 on a single-node cluster, where a replica "
            "could never be assigned and the index would stay yellow; else the cluster's default)",
        )
        action.add_argument("--engine", choices=["lucene", "faiss"], default="lucene")
        action.add_argument(
            "--space-type", choices=["cosinesimil", "innerproduct", "l2"], default="cosinesimil"
        )
        action.add_argument("--m", type=int, default=16, help="HNSW graph degree")
        action.add_argument(
            "--ef-construction", type=int, default=128, help="HNSW build beam width"
        )
    create.set_defaults(handler=_index_create)
    load.add_argument("--corpus", type=Path, required=True, help="BEIR corpus.jsonl")
    load.add_argument(
        "--skip-bad",
        action="store_true",
        help="count and report malformed lines instead of stopping",
    )
    load.set_defaults(handler=_index_load)

    bench = commands.add_parser("bench", help="closed-loop load against a running sidecar")
    bench.add_argument(
        "--url", dest="sidecar_url", help="sidecar URL (default: http://LISTEN_HOST:LISTEN_PORT)"
    )
    bench.add_argument(
        "--opensearch", help="also send the same hybrid request straight to this OpenSearch"
    )
    bench.add_argument(
        "--compare-url",
        help="a second sidecar, measured at each level right after the first (two "
        "configurations side by side, e.g. forward vs service identity)",
    )
    _add_credentials(bench)
    bench.add_argument("--index", required=True)
    bench.add_argument(
        "--queries", type=Path, help="BEIR queries.jsonl or one query per line (load, model bench)"
    )
    bench.add_argument(
        "--concurrency", help="comma-separated levels (default 1,4,16; --pass-through: 1,16)"
    )
    bench.add_argument(
        "--duration-s", type=float, help="per level (default 20; --pass-through: 10 per cell)"
    )
    bench.add_argument("--candidates", type=int, default=100)
    bench.add_argument("--k", type=int, default=10)
    bench.add_argument("--fusion", choices=["server", "rrf", "convex"], default="server")
    bench.add_argument("--no-rerank", action="store_true", help="first stage only")
    bench.add_argument("--once", action="store_true", help="send each query once, then stop")
    bench.add_argument(
        "--model-bench",
        nargs="?",
        const=",".join(MODEL_SECTIONS),
        metavar="SECTIONS",
        help="also measure the reranker in-process (needs --corpus), these sections (default "
        "both): `reranker` (raw pairs/s, micro-batching vs naive predict, warm vs cold cache, "
        "dtypes x depths x lengths), `grid` (runtime x precision x truncation on the first "
        "stage's real candidates from --url: p50 at depths 20/50/100, nDCG@10 with --qrels, "
        "Pareto front)",
    )
    bench.add_argument(
        "--qrels",
        type=Path,
        help="grid: judgments of held-out queries (e.g. the heldout-qrels.tsv train-reranker "
        "writes); their queries are the grid's, and each configuration gets its nDCG@10",
    )
    bench.add_argument(
        "--grid-truncations",
        default="first:256,best_passage:128",
        help="grid: truncation:tokens, comma-separated (tokens: the pair length for first and "
        "max_chunk, the window for best_passage)",
    )
    bench.add_argument(
        "--quality-depth", type=int, default=20, help="grid: candidates reranked for nDCG@10"
    )
    bench.add_argument(
        "--corpus", type=Path, help="BEIR corpus.jsonl for --model-bench and --bulk-docs documents"
    )
    bench.add_argument(
        "--bulk-docs",
        type=int,
        help="also bulk-write this many corpus documents through the sidecar, with and without "
        "embedding on write (two temporary indexes named after --index)",
    )
    bench.add_argument("--bulk-chunk", type=int, default=500, help="documents per _bulk request")
    bench.add_argument(
        "--skip-load", action="store_true", help="no query load, only the other figures"
    )
    bench.add_argument(
        "--pass-through",
        action="store_true",
        help="instead of the query load: requests the sidecar does not rerank, straight to "
        "--opensearch and through --url side by side (GET /, a small _search on --index and a "
        "_bulk; needs wrk: `make bench-tools`), and the sidecar's RSS with --sidecar-pid",
    )
    bench.add_argument(
        "--search-term",
        default="*",
        help="pass-through: the _search's q= (default *: every document)",
    )
    bench.add_argument(
        "--bulk-mb", type=float, default=10.0, help="pass-through: the _bulk's size (0: none)"
    )
    bench.add_argument(
        "--bulk-repeats", type=int, default=6, help="pass-through: _bulk sends per level"
    )
    bench.add_argument("--bulk-concurrency", default="1,4", help="pass-through: the _bulk's levels")
    bench.add_argument(
        "--sidecar-pid",
        type=int,
        help="pass-through: the --url sidecar's process id on this machine; its RSS is read "
        "while one --rss-bulk-mb _bulk streams through it (without it: not measured)",
    )
    bench.add_argument(
        "--rss-bulk-mb", type=float, default=100.0, help="pass-through: that _bulk's size"
    )
    bench.add_argument("--out", type=Path, help="write the figures as JSON here")
    bench.set_defaults(handler=_bench)

    soak = commands.add_parser(
        "soak", help="reranked searches at a fixed rate for a while, watching memory and caches"
    )
    soak.add_argument(
        "--url", dest="sidecar_url", help="sidecar URL (default: http://LISTEN_HOST:LISTEN_PORT)"
    )
    soak.add_argument("--index", required=True)
    soak.add_argument(
        "--queries", type=Path, required=True, help="BEIR queries.jsonl or one query per line"
    )
    soak.add_argument("--rate", type=float, default=10.0, help="searches per second")
    soak.add_argument("--duration-s", type=float, default=300.0)
    soak.add_argument("--report-every-s", type=float, default=30.0, help="progress interval")
    soak.add_argument("--candidates", type=int, default=50)
    soak.add_argument("--k", type=int, default=10)
    _add_credentials(soak)
    soak.add_argument("--out", type=Path, help="write the summary as JSON here")
    soak.set_defaults(handler=_soak)

    provenance = commands.add_parser(
        "provenance", help="share of the final top-k by retriever, rank and score range"
    )
    provenance.add_argument(
        "--url", dest="sidecar_url", required=True, help="a running sidecar (its /metrics is read)"
    )
    _add_credentials(provenance)
    provenance.set_defaults(handler=_provenance)

    evaluate = commands.add_parser("eval", help="retrieval quality per mode on a BEIR collection")
    evaluate.add_argument(
        "--dataset",
        type=Path,
        required=True,
        help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/",
    )
    evaluate.add_argument(
        "--index", required=True, help="loaded from the dataset's corpus if absent"
    )
    evaluate.add_argument(
        "--qrels", default="qrels/test.tsv", help="relative to --dataset, or an absolute path"
    )
    evaluate.add_argument(
        "--modes",
        default="",
        help="comma-separated, of bm25, knn, hybrid, hybrid+rerank (default: all of them)",
    )
    _add_credentials(evaluate)
    evaluate.add_argument("--k", type=int, default=10)
    evaluate.add_argument("--candidates", type=int, default=100, help="per retriever")
    evaluate.add_argument("--fusion", choices=["convex", "rrf", "server"], default="convex")
    evaluate.add_argument("--limit", type=int, help="only the first N judged queries")
    evaluate.add_argument("--sweep-candidates", default="", help="e.g. 20,50,100,200")
    evaluate.add_argument(
        "--sweep-fusion",
        default="",
        help="e.g. convex,rrf,server,convex:0.3:0.7 (weights lexical:vector)",
    )
    evaluate.add_argument(
        "--sweep-depth",
        default="",
        help="rerank depths, e.g. 5,10,20,50,100: only the first M of --candidates reranked, "
        "against no rerank (M = 0); quality, gain and rerank cost per M, the knee marked",
    )
    _add_sidecar_and_loading_urls(evaluate)
    evaluate.add_argument("--out", type=Path, help="report folder (default: out/eval-INDEX)")
    evaluate.set_defaults(handler=_eval)

    train = commands.add_parser(
        "train-reranker",
        help="fine-tune a cross-encoder (or distil one into a shallower student) on a BEIR "
        "collection's judgments, negatives mined through a running sidecar's first stage",
    )
    train.add_argument("--dataset", type=Path, required=True, help="BEIR folder")
    train.add_argument(
        "--qrels", default="qrels/train.tsv", help="relative to --dataset, or an absolute path"
    )
    train.add_argument("--index", required=True, help="loaded from the dataset's corpus if absent")
    start = train.add_mutually_exclusive_group()
    start.add_argument(
        "--base",
        default=DEFAULT_EMBEDDING_MODEL,
        help="Hub id or local folder: a cross-encoder, or an encoder that gets a fresh head "
        "(default: the bundled all-MiniLM-L6-v2)",
    )
    start.add_argument(
        "--teacher",
        help="Hub id or local folder of a trained cross-encoder to distil into a student of "
        "--layers layers (the teacher's first N and its head), trained on its score margins",
    )
    train.add_argument(
        "--layers",
        type=int,
        help="transformer layers to keep: the student's depth with --teacher (required), else "
        "the base is cut to its first N",
    )
    train.add_argument("--out", type=Path, required=True, help="model folder to write")
    train.add_argument(
        "--holdout-share",
        type=float,
        default=0.2,
        help=f"queries kept out of training, written to OUT/{HELDOUT_QRELS} (0: none)",
    )
    train.add_argument("--validation-share", type=float, default=0.2, help="of the rest")
    train.add_argument(
        "--candidates",
        type=int,
        default=100,
        help="per retriever, mined from; also the depth validated and early-stopped at",
    )
    train.add_argument(
        "--negatives",
        type=int,
        default=4,
        help="hard negatives per query (with --teacher: per relevant document)",
    )
    train.add_argument(
        "--negative-sampling",
        choices=["top", "spread"],
        default="top",
        help="the first non-relevant candidates, or a seeded sample of all --candidates of them",
    )
    train.add_argument(
        "--labels",
        choices=["binary", "graded"],
        default="binary",
        help="a judged-relevant document's label: 1 whatever its grade, or its grade over the "
        "highest grade judged (for graded judgments; not with --teacher)",
    )
    train.add_argument(
        "--pseudo-queries",
        type=int,
        default=0,
        help="pre-train on N pseudo-queries made from the corpus (title -> text, else first "
        "sentence -> rest) before the judgments; default 0 (off: see the README)",
    )
    train.add_argument(
        "--loss",
        choices=["bce", "listnet", "lambda"],
        default="bce",
        help="binary cross-entropy per pair, or a listwise loss over each query's documents",
    )
    train.add_argument(
        "--head",
        choices=["segment-cosine", "mean-linear"],
        default="segment-cosine",
        help="a plain encoder's fresh head: the query-document cosine in the joint encoding "
        "(ranks like the bi-encoder before training), or a linear layer on the mean of all tokens",
    )
    train.add_argument(
        "--cross-fit-folds",
        type=int,
        default=None,
        help="K >= 2: choose the serving choices on every train and validation query, each "
        "scored by one of K fold models trained on the other folds, and serve a model trained "
        "on all of them (K + 1 trainings; --validation-share unused); 0: off; default: "
        f"{DEFAULT_FOLDS} folds when the validation share would hold fewer than "
        f"{FEW_VALIDATION_QUERIES} queries and the schedule allows (one epoch, no checkpoint "
        "choice, no teacher), else off",
    )
    train.add_argument("--epochs", type=int, default=1, help="at most, with early stopping")
    train.add_argument(
        "--early-stopping-patience",
        type=int,
        default=0,
        help="stop after N validations without a better nDCG@10 (0: never)",
    )
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument(
        "--learning-rate",
        type=float,
        help="default: 2e-5 to fine-tune a cross-encoder or distil, 1e-4 for an encoder's "
        "fresh head",
    )
    train.add_argument("--max-length", type=int, default=256, help="tokens per pair")
    train.add_argument("--seed", type=int, default=13)
    train.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: SIDECAR_DEVICE)")
    train.add_argument(
        "--checkpoint-steps",
        type=int,
        help="validate and checkpoint every N steps (default: epoch)",
    )
    train.add_argument(
        "--resume", action="store_true", help="continue the interrupted run in OUT/checkpoints"
    )
    _add_sidecar_and_loading_urls(train)
    train.set_defaults(handler=_train_reranker)

    demo = commands.add_parser(
        "demo", help="load the bundled sample corpus and run an example query"
    )
    demo.add_argument(
        "--index",
        default="demo-pydoc",
        help="the demo's index (deleted and built again if it exists)",
    )
    _add_opensearch_url(demo, "OpenSearch URL")
    demo.set_defaults(handler=_demo)
    return parser


class _DeprecatedOpenSearchUrl(argparse.Action):
    """`--url` where it used to mean OpenSearch: still accepted for one release, with a warning,
    now that `--url` means the sidecar in every command."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(
            f"warning: {parser.prog} {option_string} is deprecated and will be removed in the "
            "next release: --url now means the sidecar in every command; use --opensearch URL",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def _add_opensearch_url(command: argparse.ArgumentParser, what: str) -> None:
    """`--opensearch URL`, and `--url`, its former spelling in this command."""
    command.add_argument(
        "--opensearch", dest="opensearch_url", help=f"{what} (default: SIDECAR_OPENSEARCH_URL)"
    )
    command.add_argument(
        "--url",
        dest="opensearch_url",
        action=_DeprecatedOpenSearchUrl,
        help="deprecated spelling of --opensearch",
    )


def _add_sidecar_and_loading_urls(command: argparse.ArgumentParser) -> None:
    """`--url` (the sidecar to query) and `--opensearch` (where to load a missing index)."""
    command.add_argument(
        "--url", dest="sidecar_url", help="sidecar URL (default: http://LISTEN_HOST:LISTEN_PORT)"
    )
    command.add_argument(
        "--opensearch",
        dest="opensearch_url",
        help="where to load the index if absent (default: SIDECAR_OPENSEARCH_URL)",
    )


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from sidecar.api.listener import serve
    from sidecar.app import create_app
    from sidecar.logging import configure_json_logging

    if args.listen_port:
        settings = dataclasses.replace(settings, listen_port=args.listen_port)
    configure_json_logging()
    log.info("effective configuration", extra={"settings": settings.redacted()})
    serve(create_app(settings), settings)
    return 0


def _print_status(status: NodeStatus) -> None:
    print(
        json.dumps(
            {
                **dataclasses.asdict(status),
                **{
                    key: str(value)
                    for key in ("home", "ca_certs", "admin_password_file")
                    if (value := getattr(status, key)) is not None
                },
                "running": status.running,
            },
            indent=2,
        )
    )


def _opensearch_node(args: argparse.Namespace, settings: Settings) -> LocalNode:
    """The local node the settings name, at the version `--version` asks for, if any."""
    node_settings = settings.local_node
    if args.opensearch_version:
        node_settings = dataclasses.replace(node_settings, version=args.opensearch_version)
    return LocalNode(node_settings, settings.cache_dir, os.environ)


def _opensearch_up(args: argparse.Namespace, settings: Settings) -> int:
    node = _opensearch_node(args, settings)
    started = time.monotonic()
    status = node.up()
    log.info(
        "local OpenSearch %s ready at %s in %.1fs",
        status.version,
        status.url,
        time.monotonic() - started,
    )
    if status.faiss_available is False:
        log.info(
            "faiss is not available in this node (the plugin zip has no native library): use --engine lucene"
        )
    _print_status(status)
    return 0


def _opensearch_down(args: argparse.Namespace, settings: Settings) -> int:
    node = _opensearch_node(args, settings)
    print("stopped" if node.down() else "not running")
    if args.purge:
        print(f"removed {node.home}" if node.purge() else f"nothing to remove at {node.home}")
    return 0


def _opensearch_status(args: argparse.Namespace, settings: Settings) -> int:
    status = _opensearch_node(args, settings).status()
    _print_status(status)
    return 0 if status.healthy else 3


def _index_create(args: argparse.Namespace, settings: Settings) -> int:
    from sidecar.embedding import BiEncoder, declared_dimension
    from sidecar.indexing.templates import create_index

    # The model's own files say its dimension; loading it (torch, seconds) only when they do not.
    dimension = declared_dimension(settings.embedding_model)
    if dimension is None:
        dimension = BiEncoder.from_settings(settings).dimension
    report = create_index(
        _client(settings),
        args.index,
        _vector_options(args, settings, dimension),
        replicas=args.replicas,
    )
    print(json.dumps(dataclasses.asdict(report), indent=2))
    return 0


def _index_load(args: argparse.Namespace, settings: Settings) -> int:
    from sidecar.embedding import BiEncoder
    from sidecar.indexing.loader import load_corpus
    from sidecar.indexing.templates import create_index

    if not args.corpus.is_file():
        raise ValueError(f"corpus file {args.corpus} does not exist")
    encoder = BiEncoder.from_settings(settings)
    client = _client(settings)
    create_index(
        client,
        args.index,
        _vector_options(args, settings, encoder.dimension),
        replicas=args.replicas,
    )
    started = time.monotonic()
    report = load_corpus(client, encoder, args.index, args.corpus, skip_bad=args.skip_bad)
    elapsed = time.monotonic() - started
    if report.skipped_lines:
        shown = ", ".join(map(str, report.skipped_lines[:20]))
        log.warning("skipped %d malformed lines: %s", len(report.skipped_lines), shown)
    print(
        json.dumps(
            {
                **dataclasses.asdict(report),
                "elapsed_s": round(elapsed, 1),
                "device": encoder.device,
                "dtype": encoder.dtype,
            },
            indent=2,
        )
    )
    return 0


def _model_sections(value: str | None) -> set[str]:
    sections = set(value.split(",")) if value else set()
    unknown = sections - set(MODEL_SECTIONS)
    if unknown:
        raise ValueError(
            f"--model-bench: unknown section(s) {', '.join(sorted(unknown))}; "
            f"choose from {', '.join(MODEL_SECTIONS)}"
        )
    return sections


def _stage2_grid(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from sidecar.bench import read_queries
    from sidecar.evaluation import read_qrels
    from sidecar.evaluation import read_queries as read_query_ids
    from sidecar.model_bench import available_dtypes
    from sidecar.stage2_grid import fetch_candidates, format_grid, grid, run_grid

    if args.corpus is None:
        raise ValueError("--model-bench grid needs --corpus (the texts of the candidates)")
    truncations = []
    for item in args.grid_truncations.split(","):
        truncation, _, tokens = item.partition(":")
        if truncation not in get_args(Truncation) or not tokens.isdigit():
            raise ValueError(f"--grid-truncations: {item!r} is not truncation:tokens")
        truncations.append((truncation, int(tokens)))
    qrels = read_qrels(args.qrels) if args.qrels else None
    queries = (
        read_query_ids(args.queries, qrels)
        if qrels
        else {str(n): text for n, text in enumerate(read_queries(args.queries, GRID_QUERIES))}
    )
    candidates = fetch_candidates(
        args.sidecar_url or _local_sidecar(settings), args.index, queries, args.corpus, 100
    )
    result = run_grid(
        settings.reranker_model,
        grid(available_dtypes("cpu"), truncations),
        candidates,
        quality_depth=args.quality_depth,
        qrels=qrels,
        normalization=settings.normalization,
        alpha=settings.blend_alpha(),
        max_batch_pairs=settings.rerank_max_batch_pairs,
        overlap_tokens=settings.chunk_overlap_tokens,
        cache_dir=settings.cache_dir,
    )
    print(format_grid(result))
    return result


def _bench(args: argparse.Namespace, settings: Settings) -> int:
    from sidecar.bench import benchmark, dump, print_table, read_queries
    from sidecar.embedding import BiEncoder

    results: dict[str, Any] = {}
    load = not args.skip_load and not args.pass_through
    if (load or args.model_bench) and args.queries is None:
        raise ValueError("the query load and --model-bench need --queries")
    if args.pass_through:
        results["pass_through"] = _pass_through_bench(args, settings)
    if load:
        results["load"] = benchmark(
            url=args.sidecar_url or _local_sidecar(settings),
            opensearch_url=args.opensearch,
            index=args.index,
            queries=read_queries(args.queries),
            concurrency_levels=_levels(args.concurrency or "1,4,16"),
            duration_s=args.duration_s or 20.0,
            candidates=args.candidates,
            k=args.k,
            fusion=args.fusion,
            rerank=not args.no_rerank,
            encoder=BiEncoder.from_settings(settings) if args.opensearch else None,
            once=args.once,
            headers=_basic_auth(args.user, args.password_file),
            compare_url=args.compare_url,
        )
        print_table(results["load"])
    sections = _model_sections(args.model_bench)
    if "reranker" in sections:
        from sidecar.model_bench import format_model_report, read_beir_texts, run_model_benchmarks

        if args.corpus is None:
            raise ValueError("--model-bench needs --corpus (documents to score)")
        texts, queries = read_beir_texts(
            args.corpus, args.queries, max_documents=2000, max_queries=200
        )
        results["model"] = run_model_benchmarks(
            settings.reranker_model,
            texts,
            queries,
            device=settings.device,
            dtype=settings.reranker_dtype,
            max_length=settings.reranker_max_length,
            max_batch_pairs=settings.rerank_max_batch_pairs,
            max_batch_tokens=settings.rerank_max_batch_tokens,
            max_wait_s=settings.rerank_max_wait_s,
            candidates=args.candidates,
        )
        print(format_model_report(results["model"]))
    if "grid" in sections:
        results["grid"] = _stage2_grid(args, settings)
    if args.bulk_docs:
        from sidecar.bench import bulk_write_benchmark

        if args.corpus is None:
            raise ValueError("--bulk-docs needs --corpus (documents to write)")
        results["bulk"] = bulk_write_benchmark(
            args.sidecar_url or _local_sidecar(settings),
            args.index,
            args.corpus,
            args.bulk_docs,
            BiEncoder.from_settings(settings).dimension,
            args.bulk_chunk,
        )
    if args.out:
        dump(results, args.out)
    return 0


def _pass_through_bench(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from sidecar.pass_through_bench import MEGABYTE, pass_through_benchmark

    if not args.opensearch:
        raise ValueError("--pass-through needs --opensearch URL (the cluster behind the sidecar)")
    return pass_through_benchmark(
        opensearch_url=args.opensearch,
        sidecar_url=args.sidecar_url or _local_sidecar(settings),
        index=args.index,
        search_term=args.search_term,
        concurrency_levels=_levels(args.concurrency or "1,16"),
        duration_s=args.duration_s or 10.0,
        bulk_bytes=int(args.bulk_mb * MEGABYTE),
        bulk_repeats=args.bulk_repeats,
        bulk_concurrency_levels=_levels(args.bulk_concurrency),
        rss_bulk_bytes=int(args.rss_bulk_mb * MEGABYTE),
        sidecar_pid=args.sidecar_pid,
        headers=_basic_auth(args.user, args.password_file),
    )


def _levels(value: str) -> list[int]:
    """Comma-separated concurrency levels, each at least 1."""
    levels = [int(level) for level in value.split(",")]
    if any(level < 1 for level in levels):
        raise ValueError(f"concurrency levels must be at least 1: {value}")
    return levels


def _soak(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from sidecar.bench import dump, read_queries
    from sidecar.soak import soak

    summary = asyncio.run(
        soak(
            url=args.sidecar_url or _local_sidecar(settings),
            index=args.index,
            queries=read_queries(args.queries),
            rate=args.rate,
            duration_s=args.duration_s,
            candidates=args.candidates,
            k=args.k,
            headers=_basic_auth(args.user, args.password_file),
            report_every_s=args.report_every_s,
        )
    )
    if args.out:
        dump(summary, args.out)
    return 0 if summary["errors"] == 0 else 1


def _local_sidecar(settings: Settings) -> str:
    return f"http://{settings.listen_host}:{settings.listen_port}"


def _eval(args: argparse.Namespace, settings: Settings) -> int:
    from sidecar.evaluation import (
        MODES,
        EvalOptions,
        read_qrels,
        read_queries,
        run_evaluation,
        write_report,
    )

    modes = [mode for mode in args.modes.split(",") if mode] or list(MODES)
    if unknown := sorted(set(modes) - set(MODES)):
        raise ValueError(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    rerank_depths = [int(depth) for depth in args.sweep_depth.split(",") if depth]
    if any(depth < 1 for depth in rerank_depths):
        raise ValueError("--sweep-depth entries must be at least 1 (0, no rerank, is always swept)")
    qrels = read_qrels(args.dataset / args.qrels)
    queries = read_queries(args.dataset / "queries.jsonl", qrels)
    _ensure_index(settings, args.index, args.dataset / "corpus.jsonl")
    options = EvalOptions(
        modes=modes,
        k=args.k,
        candidates=args.candidates,
        fusion=args.fusion,
        sweep_candidates=[int(d) for d in args.sweep_candidates.split(",") if d],
        sweep_fusions=[_fusion_point(spec) for spec in args.sweep_fusion.split(",") if spec],
        sweep_rerank_depths=rerank_depths,
        limit=args.limit,
        headers=_basic_auth(args.user, args.password_file),
    )
    report = run_evaluation(
        args.sidecar_url or _local_sidecar(settings), args.index, qrels, queries, options
    )
    out = args.out or Path("out") / f"eval-{args.index}"
    written = write_report(report, out)
    print((out / "report.md").read_text())
    print("written: " + ", ".join(str(path) for path in written))
    return 0


def _ensure_index(settings: Settings, index: str, corpus: Path) -> None:
    from sidecar.embedding import BiEncoder
    from sidecar.indexing.loader import load_corpus
    from sidecar.indexing.templates import VectorOptions, create_index

    client = _client(settings)
    if not client.indices.exists(index=index):
        log.info("index %s is absent: loading %s", index, corpus)
        encoder = BiEncoder.from_settings(settings)
        create_index(client, index, VectorOptions(dimension=encoder.dimension))
        load_corpus(client, encoder, index, corpus)


def _train_reranker(args: argparse.Namespace, settings: Settings) -> int:
    from sidecar.training.fit import FitOptions
    from sidecar.training.recipe import TrainOptions, check_start, train_reranker

    options = TrainOptions(
        holdout_share=args.holdout_share,
        validation_share=args.validation_share,
        candidates=args.candidates,
        negatives=args.negatives,
        negative_sampling=args.negative_sampling,
        labels=args.labels,
        pseudo_queries=args.pseudo_queries,
        teacher=args.teacher,
        layers=args.layers,
        fit=FitOptions(
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            max_length=args.max_length,
            seed=args.seed,
            device=args.device or settings.device,
            checkpoint_steps=args.checkpoint_steps,
            resume=args.resume,
            loss=args.loss,
            early_stopping_patience=args.early_stopping_patience or None,
            head=args.head,
        ),
        normalization=settings.normalization,
        cross_fit_folds=args.cross_fit_folds,
    )
    check_start(args.base, options)
    _ensure_index(settings, args.index, args.dataset / "corpus.jsonl")
    trained = train_reranker(
        args.sidecar_url or _local_sidecar(settings),
        args.index,
        args.dataset,
        args.dataset / args.qrels,
        args.base,
        args.out,
        options,
        args.command_line,
    )
    out_dir = trained.report.out_dir.resolve()
    print((out_dir / "README.md").read_text())
    # The learned scorer, the rerank depth and the blend's weight come from the model's
    # serving.json.
    sidecar = shlex.join(sidecar_command())
    url = _local_sidecar(settings)
    print(
        f"serve it:    SIDECAR_RERANKER_MODEL={shlex.quote(str(out_dir))} "
        f"SIDECAR_REPORT_CACHE_STATS=true {sidecar} serve "
        f"--opensearch {settings.opensearch_url} --listen-port {settings.listen_port}"
    )
    heldout = out_dir / HELDOUT_QRELS
    if heldout.exists():
        print(
            f"evaluate it: {sidecar} eval --url {url} --opensearch {settings.opensearch_url} "
            "--modes hybrid "
            f"--dataset {shlex.quote(shown_path(args.dataset))} --index {args.index} "
            f"--qrels {shlex.quote(str(heldout))} "
            f"--candidates {args.candidates} --sweep-depth {_DEPTH_SWEEP}"
        )
    return 0


def _fusion_point(spec: str) -> tuple[str, tuple[float, float] | None]:
    """`convex` or `convex:0.3:0.7` (lexical:vector weights)."""
    name, *weights = spec.split(":")
    if name not in {"convex", "rrf", "server"} or len(weights) not in {0, 2}:
        raise ValueError(f"--sweep-fusion entry {spec!r}: expected MODE or MODE:LEXICAL:VECTOR")
    return name, (float(weights[0]), float(weights[1])) if weights else None


def _provenance(args: argparse.Namespace, settings: Settings) -> int:
    from sidecar.provenance import fetch_metrics, format_report, parse_provenance

    headers = _basic_auth(args.user, args.password_file)
    print(format_report(parse_provenance(fetch_metrics(args.sidecar_url, headers=headers))))
    return 0


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from sidecar.demo import run_demo

    run_demo(settings, _client(settings), args.index, os.environ)
    return 0


def _vector_options(args: argparse.Namespace, settings: Settings, dimension: int) -> VectorOptions:
    from sidecar.indexing.templates import VectorOptions

    if args.engine == "faiss":
        _refuse_faiss_on_local_node(settings)
    return VectorOptions(
        dimension=dimension,
        engine=args.engine,
        space_type=args.space_type,
        m=args.m,
        ef_construction=args.ef_construction,
    )


def _refuse_faiss_on_local_node(settings: Settings) -> None:
    """The local node's k-NN plugin may lack faiss's native library; indexing would then crash it."""
    url = urlparse(settings.opensearch_url)
    if url.hostname not in {"127.0.0.1", "localhost"} or url.port is None:
        return
    node_settings = dataclasses.replace(settings.local_node, port=url.port)
    status = LocalNode(node_settings, settings.cache_dir, os.environ).status()
    if status.faiss_available is False:
        raise ValueError(
            "the local OpenSearch node has no faiss native library (the Maven Central k-NN zip "
            "does not carry it); use --engine lucene"
        )


def _add_credentials(command: argparse.ArgumentParser) -> None:
    """--user/--password-file, for commands that talk to a sidecar in front of a secured cluster."""
    command.add_argument(
        "--user", help="send basic-auth credentials as this user (with --password-file)"
    )
    command.add_argument("--password-file", type=Path, help="the --user's password, in a file")


def _basic_auth(user: str | None, password_file: Path | None) -> dict[str, str]:
    """The Authorization header for --user/--password-file (a password on the command line would
    show in the process list)."""
    if user is None:
        return {}
    if password_file is None:
        raise ValueError("--user needs --password-file")
    return {"Authorization": basic_authorization(user, password_file.read_text().strip())}


def _client(settings: Settings) -> OpenSearch:
    """The sidecar's own client for offline commands: its service credentials (if any) and the
    same TLS settings as `serve`."""
    from opensearchpy import OpenSearch

    from sidecar.app import upstream_identity, upstream_tls

    identity = upstream_identity(settings)
    return OpenSearch(
        hosts=list(settings.opensearch_urls),
        timeout=60,
        ssl_context=upstream_tls(settings),
        headers=identity.own(),
        http_auth=identity.signer,
    )


if __name__ == "__main__":
    sys.exit(main())
