"""`sidecar bench`: closed-loop load against a running sidecar, optionally side by side with the same
first-stage request sent straight to OpenSearch. Prints figures; asserts nothing about time."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from opensearchpy import OpenSearch

from sidecar.embedding import BiEncoder
from sidecar.retrieval.profiles import discover_profile
from sidecar.retrieval.queries import build_hybrid_search


@dataclass
class LevelResult:
    """Figures for one target at one concurrency level."""

    target: str
    concurrency: int
    requests: int = 0
    errors: int = 0
    rejected: int = 0
    fail_open: int = 0
    # None: the sidecar does not report them (SIDECAR_REPORT_CACHE_STATS off).
    pairs_scored: int | None = 0
    duration_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    rerank_ms: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        def percentile(values: list[float], q: float) -> float | None:
            return round(float(np.percentile(values, q)), 2) if values else None

        return {
            "target": self.target,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "throughput_rps": round(self.requests / self.duration_s, 2) if self.duration_s else 0.0,
            "p50_ms": percentile(self.latencies_ms, 50),
            "p95_ms": percentile(self.latencies_ms, 95),
            "p99_ms": percentile(self.latencies_ms, 99),
            "rerank_p50_ms": percentile(self.rerank_ms, 50),
            "errors": self.errors,
            "rejected_429": self.rejected,
            "fail_open": self.fail_open,
            "pairs_per_s": round(self.pairs_scored / self.duration_s, 1)
            if self.duration_s and self.pairs_scored is not None
            else None,
        }


def read_queries(path: Path, limit: int | None = None) -> list[str]:
    """Query texts from a BEIR queries.jsonl (one JSON object with `text` per line) or plain lines."""
    texts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        texts.append(json.loads(line)["text"] if line.lstrip().startswith("{") else line.strip())
    return texts[:limit] if limit else texts


async def run_level(
    target: str,
    concurrency: int,
    duration_s: float,
    queries: Iterator[str],
    send: Callable[[aiohttp.ClientSession, str, LevelResult], Awaitable[None]],
) -> LevelResult:
    """`concurrency` workers each send one request after another until `duration_s` has passed
    or `queries` runs out."""
    result = LevelResult(target, concurrency)
    deadline = time.perf_counter() + duration_s
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
    ) as session:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                query = next(queries, None)
                if query is None:
                    return
                started = time.perf_counter()
                await send(session, query, result)
                result.latencies_ms.append((time.perf_counter() - started) * 1000)
                result.requests += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.duration_s = time.perf_counter() - started
    return result


def sidecar_sender(
    url: str,
    index: str,
    candidates: int,
    k: int,
    fusion: str,
    rerank: bool,
    headers: Mapping[str, str] | None = None,
) -> Callable[[aiohttp.ClientSession, str, LevelResult], Awaitable[None]]:
    async def send(session: aiohttp.ClientSession, query: str, result: LevelResult) -> None:
        body = {
            "index": index,
            "query": query,
            "k": k,
            "candidates": candidates,
            "fusion": fusion,
            "rerank": rerank,
        }
        async with session.post(f"{url}/v1/search", json=body, headers=headers) as response:
            answer = await response.json()
            if response.status == 429:
                result.rejected += 1
            elif response.status != 200:
                result.errors += 1
            else:
                result.fail_open += bool(answer["rerank"]["fail_open"])
                scored = answer["rerank"]["pairs_scored"]
                result.pairs_scored = (
                    None
                    if scored is None or result.pairs_scored is None
                    else result.pairs_scored + scored
                )
                if answer["rerank"]["applied"]:
                    result.rerank_ms.append(answer["timings_ms"]["rerank"])

    return send


def direct_sender(
    opensearch_url: str,
    index: str,
    candidates: int,
    encoder: BiEncoder,
    vectors: dict[str, list[float]],
) -> Callable[[aiohttp.ClientSession, str, LevelResult], Awaitable[None]]:
    """The sidecar's `server`-fusion hybrid request, embedded in advance, sent straight to
    OpenSearch, with the profile the sidecar discovers for `index`."""
    mapping = OpenSearch(hosts=[opensearch_url], timeout=60).indices.get_mapping(index=index)
    profile = discover_profile(index, mapping, encoder.model_name, encoder.dimension)

    async def send(session: aiohttp.ClientSession, query: str, result: LevelResult) -> None:
        body = build_hybrid_search(profile, query, vectors[query], candidates)
        target = f"{opensearch_url}/{index}/_search"
        async with session.post(target, json=body) as response:
            await response.read()
            if response.status != 200:
                result.errors += 1

    return send


def benchmark(
    *,
    url: str,
    opensearch_url: str | None,
    index: str,
    queries: Sequence[str],
    concurrency_levels: Sequence[int],
    duration_s: float,
    candidates: int,
    k: int,
    fusion: str,
    rerank: bool,
    encoder: BiEncoder | None,
    once: bool = False,
    headers: Mapping[str, str] | None = None,
    compare_url: str | None = None,
) -> list[dict[str, Any]]:
    """Every level against the sidecar (each level followed by the same level against the
    sidecar at `compare_url`, if given, with the same queries: two configurations side by side),
    then (with `opensearch_url`) the same levels straight to OpenSearch. `headers` go with every
    sidecar request (a caller's credentials). Queries are used in order and not repeated while
    any are left, so the score cache stays cold unless the run outlasts the query list. With
    `once`, each query is sent exactly once per target (levels share the list)."""
    summaries = []
    targets = [("sidecar", url)] + ([("compare", compare_url)] if compare_url else [])
    cursors: dict[str, Iterator[str]] = {
        name: iter(queries) if once else itertools.cycle(queries) for name, _ in targets
    }
    for level in concurrency_levels:
        for name, target in targets:
            send = sidecar_sender(target, index, candidates, k, fusion, rerank, headers)
            result = asyncio.run(run_level(name, level, duration_s, cursors[name], send))
            summaries.append(result.summary())
            print(json.dumps(summaries[-1]), flush=True)
    if opensearch_url and encoder is not None:
        vectors = dict(zip(queries, encoder.embed(list(queries)), strict=True))
        direct = direct_sender(opensearch_url, index, candidates, encoder, vectors)
        for level in concurrency_levels:
            result = asyncio.run(
                run_level("opensearch", level, duration_s, itertools.cycle(queries), direct)
            )
            summaries.append(result.summary())
            print(json.dumps(summaries[-1]), flush=True)
    return summaries


def print_table(summaries: Sequence[dict[str, Any]]) -> None:
    columns = (
        "target",
        "concurrency",
        "requests",
        "throughput_rps",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "rerank_p50_ms",
        "errors",
        "rejected_429",
        "fail_open",
        "pairs_per_s",
    )
    print("\n" + " | ".join(columns))
    for row in summaries:
        print(" | ".join(str(row[c]) for c in columns))
    by_level = {(row["target"], row["concurrency"]): row for row in summaries}
    for (target, level), row in by_level.items():
        for other, label in (("compare", "compare"), ("opensearch", "OpenSearch")):
            reference = by_level.get((other, level))
            if target == "sidecar" and reference and reference["p50_ms"] and row["p50_ms"]:
                print(
                    f"concurrency {level}: sidecar p50 / {label} p50 = "
                    f"{row['p50_ms'] / reference['p50_ms']:.2f} "
                    f"({row['p50_ms'] - reference['p50_ms']:+.1f} ms)"
                )


def dump(results: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def bulk_write_benchmark(
    sidecar_url: str, index: str, corpus: Path, documents: int, dimension: int, chunk_size: int
) -> list[dict[str, Any]]:
    """`helpers.bulk` of the first `documents` of a BEIR corpus through the sidecar into two fresh
    indexes of the sidecar's layout on the same node, side by side: one that embeds on write and
    one whose mapping turns that off (plain pass-through). Both are deleted afterwards."""
    from opensearchpy import helpers

    from sidecar.indexing.corpus import read_corpus
    from sidecar.indexing.templates import TEXT_FIELDS, VECTOR_FIELD, VectorOptions, create_index

    docs = list(itertools.islice(read_corpus(corpus), documents))
    client = OpenSearch(hosts=[sidecar_url], timeout=600)
    rows = []
    for embed_on_write in (True, False):
        name = f"{index}-bulk-{'embed' if embed_on_write else 'plain'}"
        create_index(client, name, VectorOptions(dimension=dimension))
        client.indices.put_mapping(
            index=name,
            body={
                "_meta": {
                    "sidecar": {
                        "embed_on_write": embed_on_write,
                        "text_fields": list(TEXT_FIELDS),
                        "vector_field": VECTOR_FIELD,
                    }
                }
            },
        )
        try:
            started = time.perf_counter()
            ok, errors = helpers.bulk(
                client,
                (
                    {"_index": name, "_id": d.id, "_source": {"title": d.title, "text": d.text}}
                    for d in docs
                ),
                chunk_size=chunk_size,
                raise_on_error=False,
            )
            elapsed_s = time.perf_counter() - started
            client.indices.refresh(index=name)
            with_vector = client.count(
                index=name, body={"query": {"exists": {"field": VECTOR_FIELD}}}
            )["count"]
            rows.append(
                {
                    "embed_on_write": embed_on_write,
                    "documents": len(docs),
                    "indexed": ok,
                    "errors": len(errors) if isinstance(errors, list) else errors,
                    "with_vector": with_vector,
                    "seconds": round(elapsed_s, 2),
                    "docs_per_s": round(len(docs) / elapsed_s, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        finally:
            client.indices.delete(index=name, ignore_unavailable=True)
            client.indices.delete_index_template(name=f"sidecar-hybrid-{name}", ignore=[404])
    return rows
