"""`sidecar bench --pass-through`: what the sidecar costs the requests it does not rerank. The same
requests go straight to OpenSearch and through the sidecar, side by side in one run: `GET /` and a
small `_search` under wrk, a 10 MB `_bulk` with aiohttp, and the sidecar's resident memory while it
streams a 100 MB `_bulk`. Prints figures; asserts nothing about time."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

# A megabyte here is 10^6 bytes, so that "100 MB" stays under the cluster's 100 MiB body limit.
MEGABYTE = 1_000_000
WRK_INSTALL_HINT = "install it with `apt-get install wrk` (or `make bench-tools`)"
# The environment variable the wrk script reads the caller's Authorization from: a header on
# wrk's command line would show in the process list.
WRK_AUTHORIZATION_ENV = "PASS_THROUGH_BENCH_AUTHORIZATION"
# The prefix of the one line of JSON the script prints when wrk is done.
WRK_REPORT_PREFIX = "pass-through-bench-report "
# wrk's documented hooks: headers set at the top level go with every request; `done` gets the
# summary and the latency statistics (in microseconds) once the run ends.
WRK_SCRIPT = f"""
local authorization = os.getenv("{WRK_AUTHORIZATION_ENV}")
if authorization and authorization ~= "" then
  wrk.headers["Authorization"] = authorization
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{WRK_REPORT_PREFIX}{{"duration_us": %.0f, "requests": %.0f, "bytes": %.0f, '
    .. '"p50_us": %.0f, "p99_us": %.0f, "max_us": %.0f, "connect_errors": %.0f, '
    .. '"read_errors": %.0f, "write_errors": %.0f, "timeouts": %.0f, "non_2xx_3xx": %.0f}}\\n',
    summary.duration, summary.requests, summary.bytes,
    latency:percentile(50), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.timeout, e.status))
end
"""
# Load on each target before a case's measured cells, not recorded.
WARMUP_S = 2
# A request wrk waits for before counting it as a timeout (and leaving it out of the latencies).
WRK_TIMEOUT_S = 30
BULK_TIMEOUT = aiohttp.ClientTimeout(total=600)
SETUP_TIMEOUT = aiohttp.ClientTimeout(total=60)
RSS_SAMPLE_INTERVAL_S = 0.02
# Distinct documents the generated `_bulk` cycles through (each about 1 kB of source).
_DOCUMENT_POOL = 512
_WORDS = (
    "cluster", "shard", "replica", "segment", "merge", "refresh", "flush", "translog", "mapping",
    "analyzer", "token", "filter", "query", "score", "rank", "rerank", "vector", "embedding",
    "lexical", "hybrid", "fusion", "window", "batch", "latency", "throughput", "memory", "stream",
    "proxy", "sidecar", "node", "heap", "breaker", "bulk", "index", "search", "document", "field",
)  # fmt: skip


class PassThroughBenchError(RuntimeError):
    """The benchmark cannot run or a target failed in a way that makes its figures meaningless."""


@dataclass(frozen=True)
class Figures:
    """One target's figures for one case: `rate` per second in the row's unit (requests or
    megabytes), latencies in milliseconds (None without a completed request), `errors` counts
    socket errors, timeouts and answers other than 2xx/3xx (and `_bulk` answers with errors)."""

    requests: int
    duration_s: float
    rate: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int


@dataclass(frozen=True)
class Row:
    """One case at one concurrency, straight to OpenSearch and through the sidecar."""

    case: str
    concurrency: int
    unit: str
    direct: Figures
    sidecar: Figures

    @property
    def rate_ratio(self) -> float | None:
        """Sidecar rate / direct rate (1.0: the sidecar costs nothing; higher is better)."""
        return ratio(self.sidecar.rate, self.direct.rate)

    @property
    def p50_ratio(self) -> float | None:
        """Sidecar p50 / direct p50 (1.0: the sidecar adds nothing; lower is better)."""
        return ratio(self.sidecar.p50_ms, self.direct.p50_ms)

    def summary(self) -> dict[str, Any]:
        rate_ratio, p50_ratio = self.rate_ratio, self.p50_ratio
        return {
            **asdict(self),
            "rate_ratio": None if rate_ratio is None else round(rate_ratio, 3),
            "p50_ratio": None if p50_ratio is None else round(p50_ratio, 3),
        }


@dataclass(frozen=True)
class RssFigures:
    """The sidecar's resident memory (bytes, from /proc/PID/status VmRSS): idle before any load
    of this run, right before the large `_bulk`, its peak while the `_bulk` streams through, and
    once it is answered; `status`, `reason` (for an answer other than 200) and `seconds` are the
    `_bulk`'s answer and duration."""

    pid: int
    bulk_bytes: int
    idle_bytes: int
    before_bytes: int
    peak_bytes: int
    after_bytes: int
    status: int
    reason: str | None
    seconds: float

    @property
    def peak_ratio(self) -> float:
        """Peak / idle RSS (the issue's goal: at most 2)."""
        return self.peak_bytes / self.idle_bytes


def ratio(sidecar: float | None, direct: float | None) -> float | None:
    """sidecar / direct; None when either is missing or direct is 0."""
    if sidecar is None or not direct:
        return None
    return sidecar / direct


def parse_wrk_report(output: str) -> Figures:
    """The figures in the JSON line WRK_SCRIPT's `done` prints into wrk's output.
    Raises PassThroughBenchError when there is no such line."""
    for line in output.splitlines():
        if line.startswith(WRK_REPORT_PREFIX):
            report = json.loads(line.removeprefix(WRK_REPORT_PREFIX))
            break
    else:
        raise PassThroughBenchError(f"wrk printed no report line; its output was:\n{output}")
    duration_s = report["duration_us"] / 1e6
    requests = int(report["requests"])
    errors = sum(
        int(report[key])
        for key in ("connect_errors", "read_errors", "write_errors", "timeouts", "non_2xx_3xx")
    )
    return Figures(
        requests=requests,
        duration_s=round(duration_s, 3),
        rate=round(requests / duration_s, 1) if duration_s else 0.0,
        p50_ms=round(report["p50_us"] / 1e3, 3) if requests else None,
        p99_ms=round(report["p99_us"] / 1e3, 3) if requests else None,
        errors=errors,
    )


def find_wrk() -> str:
    """wrk's path. Raises PassThroughBenchError, naming the package, when it is not installed."""
    path = shutil.which("wrk")
    if path is None:
        raise PassThroughBenchError(
            f"--pass-through drives its load with wrk, which is not on the PATH: {WRK_INSTALL_HINT}"
        )
    return path


def run_wrk(
    wrk: str, url: str, concurrency: int, duration_s: float, authorization: str | None
) -> Figures:
    """`wrk -t1 -cN` against `url` for `duration_s` (one load thread: the machine's other cores
    are the cluster's and the sidecar's). Raises PassThroughBenchError when wrk fails."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", encoding="utf-8") as script:
        script.write(WRK_SCRIPT)
        script.flush()
        command = [
            wrk,
            "-t1",
            f"-c{concurrency}",
            f"-d{max(1, round(duration_s))}s",
            f"--timeout={WRK_TIMEOUT_S}s",
            "-s",
            script.name,
            url,
        ]
        environment = {**os.environ, WRK_AUTHORIZATION_ENV: authorization or ""}
        done = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    if done.returncode != 0:
        raise PassThroughBenchError(
            f"wrk failed against {url} (exit {done.returncode}): {done.stderr.strip()}"
        )
    return parse_wrk_report(done.stdout)


def check_answer(url: str, headers: Mapping[str, str]) -> None:
    """One GET of `url` before it is loaded: a wrong URL, index or credential fails the run at
    once instead of filling the table with errors. Raises PassThroughBenchError unless 200."""
    request = urllib.request.Request(url, headers=dict(headers))
    try:
        with urllib.request.urlopen(request, timeout=SETUP_TIMEOUT.total) as response:
            response.read()
    except urllib.error.HTTPError as error:
        raise PassThroughBenchError(
            f"GET {url} answered {error.code}: {error.read()[:300].decode(errors='replace')}"
        ) from None
    except OSError as error:
        raise PassThroughBenchError(f"GET {url} failed: {error}") from None


def build_bulk_body(size_bytes: int, index: str | None = None) -> bytes:
    """NDJSON `_bulk` of `index` actions (into the URL's index, or `index` when given), at most
    `size_bytes` long and within one document of it. Documents cycle through a pool of ~1 kB
    sources, each numbered so that none is a copy of another."""
    action = json.dumps({"index": {"_index": index}} if index else {"index": {}}).encode()
    pool = []
    for n in range(_DOCUMENT_POOL):
        words = [_WORDS[(n * 7 + i * 13) % len(_WORDS)] for i in range(140)]
        pool.append(json.dumps({"title": " ".join(words[:8]), "text": " ".join(words[8:])}))
    parts: list[bytes] = []
    total = 0
    n = 0
    while True:
        # The pool's sources end in "}": the number goes in as a last field.
        source = pool[n % _DOCUMENT_POOL][:-1] + f', "n": {n}}}'
        item = action + b"\n" + source.encode() + b"\n"
        if total + len(item) > size_bytes:
            return b"".join(parts)
        parts.append(item)
        total += len(item)
        n += 1


def read_rss_bytes(status: str) -> int:
    """Resident memory in bytes from the text of /proc/PID/status (its `VmRSS: N kB` line).
    Raises ValueError when there is none (a kernel thread, or not a status file)."""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"VmRSS in unexpected unit {unit!r}")
            return int(value) * 1024
    raise ValueError("no VmRSS line in the process status")


def process_rss_bytes(pid: int) -> int:
    """The process's resident memory now. Raises PassThroughBenchError when it is not running on
    this machine."""
    try:
        return read_rss_bytes(Path(f"/proc/{pid}/status").read_text())
    except FileNotFoundError:
        raise PassThroughBenchError(
            f"--sidecar-pid {pid}: no such process on this machine (the RSS figure needs the "
            "sidecar running here)"
        ) from None


class RssSampler(threading.Thread):
    """Samples a process's RSS every RSS_SAMPLE_INTERVAL_S until stopped; owns `peak_bytes`,
    which the caller reads after `stop()` has joined the thread."""

    def __init__(self, pid: int) -> None:
        super().__init__(name=f"rss-{pid}", daemon=True)
        self.pid = pid
        self.peak_bytes = process_rss_bytes(pid)
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(RSS_SAMPLE_INTERVAL_S):
            self.peak_bytes = max(self.peak_bytes, process_rss_bytes(self.pid))

    def stop(self) -> int:
        self._stopped.set()
        self.join()
        return self.peak_bytes


def format_table(rows: Sequence[Row], rss: RssFigures | None) -> str:
    """The rows as one Markdown table (rate per second in the row's unit, latencies in ms, the
    sidecar/direct ratios, errors direct/sidecar), then one line on the sidecar's RSS."""
    header = (
        "| case | c | direct rate | direct p50 ms | direct p99 ms | sidecar rate | "
        "sidecar p50 ms | sidecar p99 ms | sidecar/direct rate | sidecar/direct p50 | errors |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for row in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    row.case,
                    str(row.concurrency),
                    f"{row.direct.rate:,.1f} {row.unit}",
                    _number(row.direct.p50_ms),
                    _number(row.direct.p99_ms),
                    f"{row.sidecar.rate:,.1f} {row.unit}",
                    _number(row.sidecar.p50_ms),
                    _number(row.sidecar.p99_ms),
                    _ratio(row.rate_ratio),
                    _ratio(row.p50_ratio),
                    f"{row.direct.errors}/{row.sidecar.errors}",
                ]
            )
            + " |"
        )
    lines.append("")
    lines.append(format_rss(rss))
    return "\n".join(lines)


def format_rss(rss: RssFigures | None) -> str:
    if rss is None:
        return "sidecar RSS: not measured (give --sidecar-pid PID of a sidecar on this machine)"
    mib = 1024 * 1024
    return (
        f"sidecar RSS: idle {rss.idle_bytes / mib:,.0f} MiB; {rss.before_bytes / mib:,.0f} MiB "
        f"before a {rss.bulk_bytes / MEGABYTE:,.0f} MB _bulk, peak {rss.peak_bytes / mib:,.0f} "
        f"MiB while it streamed ({rss.peak_ratio:.2f}x idle), {rss.after_bytes / mib:,.0f} MiB "
        f"after; the _bulk got {rss.status}{f' ({rss.reason})' if rss.reason else ''} in "
        f"{rss.seconds:.1f} s"
    )


def describe_error(answer: bytes) -> str:
    """An error answer in a few words: OpenSearch's `error.type: error.reason` (the reason cut
    at 160 characters), else the answer's start."""
    try:
        error = json.loads(answer)["error"]
        return f"{error['type']}: {str(error['reason'])[:160]}"
    except (ValueError, KeyError, TypeError):
        return answer[:160].decode(errors="replace")


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def percentile_ms(latencies_s: Sequence[float], q: int) -> float | None:
    """The q-th percentile (1-99) of latencies in seconds, in ms; None for none, the one value
    for one (statistics' inclusive method: no extrapolation beyond the slowest)."""
    if not latencies_s:
        return None
    if len(latencies_s) == 1:
        return round(latencies_s[0] * 1e3, 3)
    cuts = statistics.quantiles(latencies_s, n=100, method="inclusive")
    return round(cuts[q - 1] * 1e3, 3)


async def _send_bulks(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    repeats: int,
    concurrency: int,
    headers: Mapping[str, str],
) -> Figures:
    """`repeats` sends of `body` to `url`, `concurrency` at a time; a send is timed until its
    answer is read whole, and counts as an error unless it is 200 without item errors."""
    latencies_s: list[float] = []
    errors = 0
    remaining = iter(range(repeats))

    async def worker() -> None:
        nonlocal errors
        for _ in remaining:
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as response:
                answer = await response.read()
                latencies_s.append(time.perf_counter() - started)
                if response.status != 200 or json.loads(answer).get("errors", True):
                    errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed_s = time.perf_counter() - started
    return Figures(
        requests=repeats,
        duration_s=round(elapsed_s, 3),
        rate=round(repeats * len(body) / MEGABYTE / elapsed_s, 1),
        p50_ms=percentile_ms(latencies_s, 50),
        p99_ms=percentile_ms(latencies_s, 99),
        errors=errors,
    )


class ScratchIndex:
    """An index the `_bulk` sends write into, created straight on OpenSearch (one shard, no
    replica, no periodic refresh) and deleted on exit, whatever happened."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        opensearch_url: str,
        name: str,
        headers: Mapping[str, str],
    ) -> None:
        self.url = f"{opensearch_url}/{quote(name)}"
        self.session = session
        self.headers = headers

    async def __aenter__(self) -> ScratchIndex:
        settings = {
            "settings": {"number_of_shards": 1, "number_of_replicas": 0, "refresh_interval": "-1"}
        }
        async with self.session.put(
            self.url, json=settings, headers=self.headers, timeout=SETUP_TIMEOUT
        ) as response:
            if response.status != 200:
                raise PassThroughBenchError(
                    f"creating the scratch index {self.url} got {response.status}: "
                    f"{(await response.text())[:300]}"
                )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        async with self.session.delete(
            self.url, headers=self.headers, timeout=SETUP_TIMEOUT
        ) as response:
            await response.read()


async def _bulk_rows(
    opensearch_url: str,
    sidecar_url: str,
    scratch: str,
    bulk_bytes: int,
    repeats: int,
    concurrency_levels: Sequence[int],
    headers: Mapping[str, str],
) -> list[Row]:
    """The `_bulk` case: each level straight to OpenSearch, then through the sidecar, each into
    a fresh scratch index (so both write into an index of the same size)."""
    body = build_bulk_body(bulk_bytes)
    send_headers = {**headers, "Content-Type": "application/x-ndjson"}
    path = f"/{quote(scratch)}/_bulk?refresh=false"
    rows = []
    connector = aiohttp.TCPConnector(limit=max(concurrency_levels))
    async with aiohttp.ClientSession(connector=connector, timeout=BULK_TIMEOUT) as session:
        for level in concurrency_levels:
            figures = {}
            for target, base in (("direct", opensearch_url), ("sidecar", sidecar_url)):
                async with ScratchIndex(session, opensearch_url, scratch, headers):
                    figures[target] = await _send_bulks(
                        session, base + path, body, repeats, level, send_headers
                    )
            rows.append(
                Row(
                    f"_bulk {bulk_bytes / MEGABYTE:g} MB",
                    level,
                    "MB/s",
                    figures["direct"],
                    figures["sidecar"],
                )
            )
            print(json.dumps(rows[-1].summary()), flush=True)
    return rows


async def _measure_rss(
    opensearch_url: str,
    sidecar_url: str,
    scratch: str,
    bulk_bytes: int,
    pid: int,
    idle_bytes: int,
    headers: Mapping[str, str],
) -> RssFigures:
    """One `bulk_bytes` `_bulk` through the sidecar while a thread samples its RSS."""
    body = build_bulk_body(bulk_bytes)
    send_headers = {**headers, "Content-Type": "application/x-ndjson"}
    async with (
        aiohttp.ClientSession(timeout=BULK_TIMEOUT) as session,
        ScratchIndex(session, opensearch_url, scratch, headers),
    ):
        before_bytes = process_rss_bytes(pid)
        sampler = RssSampler(pid)
        sampler.start()
        started = time.perf_counter()
        try:
            async with session.post(
                f"{sidecar_url}/{quote(scratch)}/_bulk?refresh=false",
                data=body,
                headers=send_headers,
            ) as response:
                answer = await response.read()
                status = response.status
        finally:
            seconds = time.perf_counter() - started
            peak_bytes = sampler.stop()
        after_bytes = process_rss_bytes(pid)
    return RssFigures(
        pid=pid,
        bulk_bytes=len(body),
        idle_bytes=idle_bytes,
        before_bytes=before_bytes,
        peak_bytes=peak_bytes,
        after_bytes=after_bytes,
        status=status,
        reason=None if status == 200 else describe_error(answer),
        seconds=round(seconds, 2),
    )


def pass_through_benchmark(
    *,
    opensearch_url: str,
    sidecar_url: str,
    index: str,
    search_term: str,
    concurrency_levels: Sequence[int],
    duration_s: float,
    bulk_bytes: int,
    bulk_repeats: int,
    bulk_concurrency_levels: Sequence[int],
    rss_bulk_bytes: int,
    sidecar_pid: int | None,
    headers: Mapping[str, str],
) -> dict[str, Any]:
    """Every case straight to OpenSearch and through the sidecar, one right after the other at
    each level: `GET /` and `GET index/_search?q=search_term&size=10` under wrk for `duration_s`
    (after WARMUP_S on each target at the highest level),
    `bulk_repeats` sends of a `bulk_bytes` `_bulk` (skipped at 0), then (with `sidecar_pid`, and
    `rss_bulk_bytes` > 0) the sidecar's RSS while one `rss_bulk_bytes` `_bulk` streams through.
    `headers` (a caller's credentials) go to both targets. Prints the table; returns the figures.
    Raises PassThroughBenchError when wrk is missing or fails, or the pid is not running here."""
    wrk = find_wrk()
    opensearch_url, sidecar_url = opensearch_url.rstrip("/"), sidecar_url.rstrip("/")
    # Idle: before this run sends anything.
    idle_bytes = process_rss_bytes(sidecar_pid) if sidecar_pid is not None else None
    authorization = headers.get("Authorization")
    cases = (
        ("GET /", "/"),
        (f"_search q={search_term}", f"/{quote(index)}/_search?q={quote(search_term)}&size=10"),
    )
    for _, path in cases:
        for base in (opensearch_url, sidecar_url):
            check_answer(base + path, headers)
    rows = []
    for case, path in cases:
        # Not recorded: the cluster's JIT and caches warm up on whichever target goes first.
        for base in (opensearch_url, sidecar_url):
            run_wrk(wrk, base + path, max(concurrency_levels), WARMUP_S, authorization)
        for level in concurrency_levels:
            direct = run_wrk(wrk, opensearch_url + path, level, duration_s, authorization)
            sidecar = run_wrk(wrk, sidecar_url + path, level, duration_s, authorization)
            rows.append(Row(case, level, "req/s", direct, sidecar))
            print(json.dumps(rows[-1].summary()), flush=True)
    scratch = f"pass-through-bench-{os.getpid()}"
    if bulk_bytes > 0 and bulk_repeats > 0:
        rows += asyncio.run(
            _bulk_rows(
                opensearch_url,
                sidecar_url,
                scratch,
                bulk_bytes,
                bulk_repeats,
                bulk_concurrency_levels,
                headers,
            )
        )
    rss = None
    if sidecar_pid is not None and idle_bytes is not None and rss_bulk_bytes > 0:
        rss = asyncio.run(
            _measure_rss(
                opensearch_url,
                sidecar_url,
                scratch,
                rss_bulk_bytes,
                sidecar_pid,
                idle_bytes,
                headers,
            )
        )
    print("\n" + format_table(rows, rss), flush=True)
    return {
        "opensearch_url": opensearch_url,
        "sidecar_url": sidecar_url,
        "duration_s": duration_s,
        "rows": [row.summary() for row in rows],
        "rss": None if rss is None else {**asdict(rss), "peak_ratio": round(rss.peak_ratio, 3)},
    }
