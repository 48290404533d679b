"""`make demo`: load the bundled sample corpus, start the sidecar, send one query through it with
curl and print the answer with each hit's provenance."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from opensearchpy import OpenSearch

from sidecar.config import Settings
from sidecar.embedding import BiEncoder
from sidecar.indexing.loader import load_corpus
from sidecar.indexing.sample import write_sample_corpus
from sidecar.indexing.templates import VectorOptions, create_index
from sidecar.rerank.backend import build_untrained_cross_encoder, hub_model_available

EXAMPLE_QUERY = "how do I make sure cleanup code runs even when an error is raised"
_READY_TIMEOUT_S = 300.0


def run_demo(
    settings: Settings, client: OpenSearch, index: str, environ: Mapping[str, str]
) -> None:
    corpus = settings.cache_dir / "sample" / "pydoc-corpus.jsonl"
    count = write_sample_corpus(corpus)
    print(f"sample corpus: {count} sections of Python's reference documentation -> {corpus}")
    encoder = BiEncoder.from_settings(settings)
    create_index(client, index, VectorOptions(dimension=encoder.dimension))
    report = load_corpus(client, encoder, index, corpus)
    print(
        f"index {index!r}: {report.index_count} documents (bi-encoder on {encoder.device}, {encoder.dtype})"
    )

    reranker = settings.reranker_model
    if not hub_model_available(reranker):
        fallback = build_untrained_cross_encoder(
            settings.cache_dir / "models" / "untrained-minilm-mean-cross-encoder"
        )
        print(
            f"\nnote: the cross-encoder {reranker!r} is not available offline (no local copy, Hub "
            f"unreachable), so this demo reranks with {fallback}:\n      the all-MiniLM-L6-v2 "
            "encoder with an UNTRAINED head. Its order is not meaningful relevance; point "
            "SIDECAR_RERANKER_MODEL at a trained cross-encoder for that."
        )
        reranker = str(fallback)

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
            _query(url, index)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print("\nsidecar stopped. Run it yourself with: sidecar serve   (configuration: README.md)")


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


def _query(url: str, index: str) -> None:
    body = json.dumps({"index": index, "query": EXAMPLE_QUERY, "k": 5, "candidates": 50})
    command = [
        "curl",
        "-s",
        "-X",
        "POST",
        f"{url}/v1/search",
        "-H",
        "Content-Type: application/json",
        "-d",
        body,
    ]
    print(f"\n$ {shlex.join(command)}")
    answer: dict[str, Any] = json.loads(
        subprocess.run(command, check=True, capture_output=True).stdout
    )
    rerank = answer["rerank"]
    print(
        f"took {answer['took']} ms over {answer['candidates']} candidates; timings {answer['timings_ms']}\n"
        f"rerank: applied={rerank['applied']} model={rerank['model']} on {rerank['device']}/{rerank['dtype']}"
        f" fail_open={rerank['fail_open']}\n"
    )
    print(
        f"{'#':>2} {'score':>6} {'logit':>7} {'1st':>4} {'bm25 rank/score':>16} {'knn rank/score':>15}  title"
    )
    for position, hit in enumerate(answer["hits"], start=1):
        lexical, vector = hit["sources"]["lexical"], hit["sources"]["vector"]
        print(
            f"{position:>2} {hit['score']:>6.3f} {hit['rerank_score'] or 0:>7.3f} {hit['first_stage']['rank']:>4} "
            f"{_provenance(lexical):>16} {_provenance(vector):>15}  {hit['source'].get('title', '')}"
        )


def _provenance(source: dict[str, Any] | None) -> str:
    return "-" if source is None else f"{source['rank']} / {source['score']:.3f}"
