"""`sidecar soak`: reranked searches against a running sidecar at a fixed rate (open loop: arrivals do
not wait for answers) for a bounded time, watching the sidecar's own resident memory and cache
sizes on its /metrics. What it shows: whether memory and caches stay bounded over time, and that no
request fails at a sustainable rate. Prints a progress line per interval and a summary."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families


async def read_process_figures(
    session: aiohttp.ClientSession, url: str, headers: Mapping[str, str] | None
) -> dict[str, float]:
    """The sidecar's resident memory (bytes) and the entries of each cache, from its /metrics."""
    async with session.get(f"{url}/metrics", headers=headers) as response:
        response.raise_for_status()
        text = await response.text()
    figures: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "process_resident_memory_bytes":
                figures["rss_bytes"] = sample.value
            elif sample.name == "sidecar_cache_entries":
                figures[f"cache_{sample.labels['cache']}"] = sample.value
    return figures


async def soak(
    *,
    url: str,
    index: str,
    queries: Sequence[str],
    rate: float,
    duration_s: float,
    candidates: int,
    k: int,
    headers: Mapping[str, str] | None = None,
    report_every_s: float = 30.0,
    request_timeout_s: float = 60.0,
) -> dict[str, Any]:
    """`rate` searches per second for `duration_s`, queries taken in turn (repeating once used
    up, so the score cache sees hits and fills to its bound). An answer other than 200, or none
    within `request_timeout_s`, is an error; a 200 in first-stage order is counted as fail-open
    (the rate is more than the reranker keeps up with)."""
    statuses: Counter[str] = Counter()
    fail_open: Counter[str] = Counter()  # answered in first-stage order, by reason
    latencies_ms: list[float] = []
    cursor = itertools.cycle(queries)
    timeout = aiohttp.ClientTimeout(total=request_timeout_s)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
    ) as session:

        async def search(query: str) -> None:
            body = {"index": index, "query": query, "k": k, "candidates": candidates}
            started = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/search", json=body, headers=headers) as answer:
                    payload = await answer.json()
                    statuses[str(answer.status)] += 1
                    if answer.status == 200 and payload["rerank"]["fail_open"]:
                        fail_open[str(payload["rerank"]["reason"])] += 1
            except (aiohttp.ClientError, TimeoutError, ValueError) as error:
                statuses[type(error).__name__] += 1
                return
            latencies_ms.append((time.perf_counter() - started) * 1000)

        start = await read_process_figures(session, url, headers)
        print(json.dumps({"at_s": 0, **start}), flush=True)
        began = time.perf_counter()
        next_report = report_every_s
        tasks: set[asyncio.Task[None]] = set()
        for n in itertools.count():
            arrival = n / rate
            if arrival >= duration_s:
                break
            if arrival >= next_report:
                figures = await read_process_figures(session, url, headers)
                progress = {"at_s": round(arrival), "requests": n, **figures}
                errors = {"errors": _errors(statuses), "fail_open": sum(fail_open.values())}
                print(json.dumps(progress | errors), flush=True)
                next_report += report_every_s
            await asyncio.sleep(max(0.0, began + arrival - time.perf_counter()))
            task = asyncio.create_task(search(next(cursor)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        elapsed_s = time.perf_counter() - began
        end = await read_process_figures(session, url, headers)
    summary = {
        "requests": sum(statuses.values()),
        "rate_per_s": rate,
        "duration_s": round(elapsed_s, 1),
        "errors": _errors(statuses),
        "statuses": dict(statuses),
        "fail_open": dict(fail_open),
        "p50_ms": round(float(np.percentile(latencies_ms, 50)), 1) if latencies_ms else None,
        "p99_ms": round(float(np.percentile(latencies_ms, 99)), 1) if latencies_ms else None,
        "start": start,
        "end": end,
    }
    print(json.dumps(summary), flush=True)
    return summary


def _errors(statuses: Counter[str]) -> int:
    return sum(count for status, count in statuses.items() if status != "200")
