"""`make demo`: load the bundled sample corpus, start the sidecar, send one query through it with
curl, print the reranked order beside the first stage's, and then the exact commands to go on
with what it built: serve, query, provenance, train a real reranker, stop and remove it all."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from sidecar.config import Settings
from sidecar.embedding import BiEncoder
from sidecar.indexing.loader import load_corpus
from sidecar.indexing.sample import write_sample_corpus
from sidecar.indexing.templates import VectorOptions, create_index
from sidecar.local_opensearch.node import LocalNode
from sidecar.printed_commands import shown_path, sidecar_command
from sidecar.processes import stop
from sidecar.rerank.backend import build_untrained_cross_encoder, hub_model_available

if TYPE_CHECKING:
    from opensearchpy import OpenSearch

EXAMPLE_QUERY = "how do I make sure cleanup code runs even when an error is raised"
# The line that opens the block of commands to go on with (the integration test reads after it).
NEXT_STEPS = "Go on from here"
_READY_TIMEOUT_S = 300.0
# The request budget the printed serve step asks for when the demo's own rerank ran out of the
# default one: a small or busy CPU scores the demo's candidates slower than that.
_SLOW_CPU_REQUEST_TIMEOUT_S = 30
_SHOWN_HITS = 5
# Candidates reranked per query: 100 (the default) take longer than the 10 s request budget on a
# 2-core CPU on the first requests, which would then fail open to the first-stage order.
_CANDIDATES = 50
_TITLE_CHARS = 28
# A BEIR collection with training judgments where this checkout's tests also find it, and what
# is known of the time training on it takes (README.md, "Training a domain reranker").
_TRAINING_COLLECTION = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"
_TRAINING_TIME = (
    "42 min on 2 CPU cores without a GPU or bf16 units, and about 6 min more the first time, to "
    "load SciFact into the node"
)


def run_demo(
    settings: Settings, client: OpenSearch, index: str, environ: Mapping[str, str]
) -> None:
    corpus = settings.cache_dir / "sample" / "pydoc-corpus.jsonl"
    count = write_sample_corpus(corpus)
    print(
        f"sample corpus: {count} distinct sections of Python's reference documentation -> {corpus}"
    )
    encoder = BiEncoder.from_settings(settings)
    if client.indices.exists(index=index):
        # Rebuilt: an earlier run's index may hold sections this corpus no longer has.
        client.indices.delete(index=index)
        print(f"index {index!r} of an earlier run deleted, to be built again")
    create_index(client, index, VectorOptions(dimension=encoder.dimension))
    report = load_corpus(client, encoder, index, corpus)
    print(
        f"index {index!r}: {report.index_count} documents (bi-encoder on {encoder.device}, {encoder.dtype})"
    )

    reranker, stand_in = settings.reranker_model, False
    if not hub_model_available(reranker):
        fallback = build_untrained_cross_encoder(
            settings.cache_dir / "models" / "untrained-minilm-mean-cross-encoder"
        )
        print(
            f"\nnote: the cross-encoder {reranker!r} is not available offline (no local copy, Hub "
            f"unreachable), so this demo reranks with {fallback}:\n      the all-MiniLM-L6-v2 "
            "encoder with an UNTRAINED head, a stand-in that shows the pipeline working."
        )
        reranker, stand_in = str(fallback), True

    url = f"http://{settings.listen_host}:{settings.listen_port}"
    env = {
        **environ,
        "SIDECAR_RERANKER_MODEL": reranker,
        "SIDECAR_OPENSEARCH_URL": settings.opensearch_url,
    }
    log_path = settings.cache_dir / "demo-sidecar.log"
    with log_path.open("w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "serve"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_ready(url, server, log_path)
            print(f"\nsidecar ready at {url} (log: {log_path})")
            failed_open = _compare(url, index)
        finally:
            _stop(server, settings.shutdown_grace_s, log_path)
    if failed_open is not None:
        print(
            "\n"
            + _FAILED_OPEN.get(failed_open, _FAILED_OPEN["model_error"]).format(
                log=log_path,
                timeout=settings.request_timeout_s,
                candidates=_CANDIDATES,
                slow_cpu_timeout=_SLOW_CPU_REQUEST_TIMEOUT_S,
            )
        )
    elif stand_in:
        print(
            "\nThe reranker is the untrained stand-in: its order (right) is not meaningful "
            "relevance, the first stage's (left) is the one to trust. Step 4 below trains a real one."
        )
    print("\nsidecar stopped.")
    slow_cpu = failed_open == "deadline"
    print(next_steps(settings, index, reranker, stand_in, slow_cpu))


def next_steps(
    settings: Settings, index: str, reranker: str, stand_in: bool, slow_cpu: bool = False
) -> str:
    """The commands to go on with what the demo built, in the order they are meant to be run,
    each step a `#` comment over its command lines; README.md "After the demo" shows the same.
    `slow_cpu` (the demo's rerank ran out of the request budget here) gives the serve step a
    larger budget, so that its searches are reranked on this machine as printed."""
    sidecar = sidecar_command()
    upstream = settings.opensearch_url
    url = f"http://{settings.listen_host}:{settings.listen_port}"
    native = {"index": index, "query": EXAMPLE_QUERY, "k": _SHOWN_HITS, "candidates": _CANDIDATES}
    intercepted = {
        "query": {"multi_match": {"query": EXAMPLE_QUERY, "fields": ["title", "text"]}},
        "size": _SHOWN_HITS,
        "_source": ["title"],
        "ext": {"rerank": {"query_context": {"query_text": EXAMPLE_QUERY}, "window": _CANDIDATES}},
    }
    serve = [
        *sidecar,
        "serve",
        "--opensearch",
        upstream,
        "--listen-port",
        str(settings.listen_port),
    ]
    serve_settings = f"SIDECAR_RERANKER_MODEL={shlex.quote(reranker)} " + (
        f"SIDECAR_REQUEST_TIMEOUT_S={_SLOW_CPU_REQUEST_TIMEOUT_S} " if slow_cpu else ""
    )
    steps = [
        (
            "serve the sidecar with the demo's reranker, in front of the demo's OpenSearch "
            "(Ctrl-C stops it)",
            [f"{serve_settings}{shlex.join(serve)}"],
        ),
        (
            "in another shell: a native search, then OpenSearch's own _search reranked through "
            "ext.rerank",
            [
                shlex.join(_curl(f"{url}/v1/search", native)),
                shlex.join(_curl(f"{url}/{index}/_search", intercepted)),
            ],
        ),
        (
            "where the final hits came from (native searches; intercepted ones are counted apart)",
            [shlex.join([*sidecar, "provenance", "--url", url])],
        ),
    ]
    if stand_in:
        found = _TRAINING_COLLECTION.is_dir()
        train = [
            *sidecar,
            "train-reranker",
            "--dataset",
            shown_path(_TRAINING_COLLECTION) if found else "SCIFACT",
            "--qrels",
            "qrels/train.tsv",
            "--index",
            "scifact",
            "--out",
            "out/reranker-scifact",
            "--url",
            url,
            "--opensearch",
            upstream,
        ]
        steps.append(
            (
                "a real reranker: train one on SciFact's judgments"
                + ("" if found else " (SCIFACT: the BEIR SciFact folder)")
                + f" while step 1 runs ({_TRAINING_TIME}); then serve it instead of step 1 with "
                'the "serve it:" line it prints',
                [shlex.join(train)],
            )
        )
    node = _local_node(settings)
    if node is not None:
        remove = (
            f"stop the node and delete its home {node.home} (install, data, logs)",
            shlex.join([*sidecar, "opensearch", "down", "--port", str(node.port), "--purge"]),
        )
    else:
        remove = (
            f"delete the demo's index from {upstream}",
            shlex.join(["curl", "-s", "-X", "DELETE", f"{upstream}/{index}"]),
        )
    cleanup = [remove[1], shlex.join(["rm", "-rf", str(settings.cache_dir)])]
    what = "the downloads kept for the next run (OpenSearch zips, sample corpus, stand-in model)"
    if Path(sys.prefix) == Path.cwd() / ".venv":
        cleanup.append("make clean")
        what += ", the checkout's virtualenv"
    steps.append((f"stop and remove everything: Ctrl-C the sidecar; {remove[0]}; {what}", cleanup))

    where = f"the OpenSearch node on port {node.port}" if node else f"OpenSearch at {upstream}"
    lines = [f'{NEXT_STEPS} ({where} keeps running; README.md, "After the demo"):', ""]
    for number, (comment, commands) in enumerate(steps, start=1):
        lines.append(f"  # {number}. {comment}")
        lines += [f"  {command}" for command in commands]
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class _Node:
    port: int
    home: Path


def _local_node(settings: Settings) -> _Node | None:
    """The project-managed node behind the OpenSearch URL, if that is where the demo ran."""
    url = urlparse(settings.opensearch_url)
    if url.hostname not in {"127.0.0.1", "localhost"} or url.port is None:
        return None
    node_settings = dataclasses.replace(settings.local_node, port=url.port)
    node = LocalNode(node_settings, settings.cache_dir, os.environ)
    return _Node(url.port, node.home) if node.status().running else None


def _wait_ready(url: str, server: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the sidecar exited with code {server.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the sidecar was not ready after {_READY_TIMEOUT_S:.0f}s; see {log_path}")


def _stop(server: subprocess.Popen[bytes], grace_s: float, log_path: Path) -> None:
    """SIGTERM, and SIGKILL if the sidecar has not exited after its own drain bound: no request
    of the demo's is in flight by then, only a model batch whose request failed open, which the
    sidecar finishes before it exits and nobody waits for."""
    if stop(server, grace_s):
        print(
            f"\nnote: the sidecar was still scoring a batch nobody waits for {grace_s:g} s after "
            f"SIGTERM (SIDECAR_SHUTDOWN_GRACE_S), so the demo killed it; its log: {log_path}"
        )


def _curl(url: str, body: Mapping[str, Any]) -> list[str]:
    return [
        "curl",
        "-s",
        "-X",
        "POST",
        url,
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps(body),
    ]


def _post(command: Sequence[str]) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(
        subprocess.run(command, check=True, capture_output=True).stdout
    )
    return answer


# Why the right side is the first-stage order when the rerank stage failed open, by its reason.
_FAILED_OPEN = {
    "deadline": (
        "The rerank stage did not finish within the request's deadline (SIDECAR_REQUEST_TIMEOUT_S, "
        "{timeout:g} s) and failed open: the right side is the first-stage order, not reranked. "
        "A small or busy CPU scores {candidates} candidates slower than that: serve with "
        "SIDECAR_REQUEST_TIMEOUT_S={slow_cpu_timeout} (step 1 below does), or ask for fewer "
        '"candidates".'
    ),
    "model_error": (
        "The rerank stage failed and the sidecar failed open: the right side is the first-stage "
        "order, not reranked. The sidecar's log says why: {log}"
    ),
}


def _compare(url: str, index: str) -> str | None:
    """The query reranked, beside the same query's first-stage order (`"rerank": false`); the
    reason the rerank stage failed open, if it did."""
    body = {"index": index, "query": EXAMPLE_QUERY, "k": _SHOWN_HITS, "candidates": _CANDIDATES}
    command = _curl(f"{url}/v1/search", body)
    print(f"\n$ {shlex.join(command)}")
    reranked = _post(command)
    first_stage = _post(_curl(f"{url}/v1/search", {**body, "rerank": False}))
    rerank = reranked["rerank"]
    print(
        f"took {reranked['took']} ms over {reranked['candidates']} candidates; timings {reranked['timings_ms']}\n"
        f"rerank: applied={rerank['applied']} model={rerank['model']} on {rerank['device']}/{rerank['dtype']}"
        f" fail_open={rerank['fail_open']}\n"
        'left: the same request with "rerank": false (BM25 + k-NN, fused); '
        "right: reranked, with each hit's first-stage rank\n"
    )
    title = f"{'title':<{_TITLE_CHARS}}"
    print(
        f"{'#':>2} {'fused':>5} {'bm25 #/score':>12} {'knn #/score':>11}  {title} | "
        f"{'1st':>3} {'found by':<8} {'score':>5} {'logit':>6}  title"
    )
    for position, (left, right) in enumerate(
        zip(first_stage["hits"], reranked["hits"], strict=False), start=1
    ):
        lexical, vector = left["sources"]["lexical"], left["sources"]["vector"]
        print(
            f"{position:>2} {_number(left['first_stage']['score'], '.3f'):>5} "
            f"{_retrieved(lexical, '.2f'):>12} {_retrieved(vector, '.3f'):>11}  "
            f"{_title(left):<{_TITLE_CHARS}} | {right['first_stage']['rank']:>3} "
            f"{_found_by(right):<8} {_number(right['score'], '.3f'):>5} "
            f"{_number(right['rerank_score'], '.2f'):>6}  {_title(right)}"
        )
    return str(rerank["reason"]) if rerank["fail_open"] else None


def _retrieved(source: dict[str, Any] | None, score_format: str) -> str:
    return "-" if source is None else f"{source['rank']}/{_number(source['score'], score_format)}"


def _found_by(hit: dict[str, Any]) -> str:
    lexical, vector = hit["sources"]["lexical"] is not None, hit["sources"]["vector"] is not None
    return "both" if lexical and vector else "bm25" if lexical else "knn"


def _number(value: float | None, number_format: str) -> str:
    """Scores are null in answers where they were not finite."""
    return "-" if value is None else format(value, number_format)


def _title(hit: dict[str, Any]) -> str:
    title = str(hit["source"].get("title") or hit["id"])
    return title if len(title) <= _TITLE_CHARS else title[: _TITLE_CHARS - 1] + "…"
