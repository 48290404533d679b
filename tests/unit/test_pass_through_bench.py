"""`sidecar bench --pass-through`'s pure parts: wrk's report, the ratio table, the generated
`_bulk` and the RSS read from /proc. No load is generated and nothing is timed."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sidecar.pass_through_bench import (
    MEGABYTE,
    WRK_REPORT_PREFIX,
    WRK_SCRIPT,
    Figures,
    PassThroughBenchError,
    Row,
    RssFigures,
    build_bulk_body,
    describe_error,
    format_rss,
    format_table,
    parse_wrk_report,
    percentile_ms,
    ratio,
    read_rss_bytes,
)

# What wrk prints with WRK_SCRIPT: its own text report, then the script's line.
WRK_OUTPUT = f"""Running 10s test @ http://127.0.0.1:9280/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   312.41us  101.20us   4.10ms   91.02%
  548000 requests in 10.00s, 260.11MB read
Requests/sec:  54800.00
Transfer/sec:     26.01MB
{WRK_REPORT_PREFIX}{{"duration_us": 10000000, "requests": 548000, "bytes": 272748000, "p50_us": 290, "p99_us": 812, "max_us": 4100, "connect_errors": 0, "read_errors": 1, "write_errors": 0, "timeouts": 2, "non_2xx_3xx": 3}}
"""


def _figures(rate: float, p50_ms: float | None, errors: int = 0) -> Figures:
    return Figures(
        requests=100, duration_s=10.0, rate=rate, p50_ms=p50_ms, p99_ms=p50_ms, errors=errors
    )


def test_wrk_report_gives_requests_per_second_and_percentiles_in_ms() -> None:
    figures = parse_wrk_report(WRK_OUTPUT)
    assert figures == Figures(
        requests=548000, duration_s=10.0, rate=54800.0, p50_ms=0.29, p99_ms=0.812, errors=6
    )


def test_wrk_report_without_a_completed_request_has_no_latencies() -> None:
    line = WRK_OUTPUT.splitlines()[-1]
    report = json.loads(line.removeprefix(WRK_REPORT_PREFIX))
    report.update(requests=0, connect_errors=16)
    figures = parse_wrk_report(WRK_REPORT_PREFIX + json.dumps(report))
    assert (figures.rate, figures.p50_ms, figures.p99_ms, figures.errors) == (0.0, None, None, 22)


def test_wrk_output_without_the_report_line_is_an_error_that_shows_it() -> None:
    with pytest.raises(PassThroughBenchError, match=r"(?s)no report line.*Requests/sec"):
        parse_wrk_report(WRK_OUTPUT.rsplit("\n", 2)[0])


def test_the_wrk_script_prints_the_line_the_parser_reads() -> None:
    assert f"'{WRK_REPORT_PREFIX}{{" in WRK_SCRIPT
    for key in ("duration_us", "requests", "p50_us", "p99_us", "non_2xx_3xx"):
        assert f'"{key}"' in WRK_SCRIPT


@pytest.mark.parametrize(
    ("sidecar", "direct", "expected"),
    [(90.0, 100.0, 0.9), (5.0, 0.0, None), (None, 10.0, None), (3.0, None, None)],
)
def test_ratio_is_sidecar_over_direct_or_none(
    sidecar: float | None, direct: float | None, expected: float | None
) -> None:
    assert ratio(sidecar, direct) == expected


def test_row_ratios_rate_higher_is_better_p50_lower_is_better() -> None:
    row = Row("GET /", 16, "req/s", _figures(50_000.0, 0.25), _figures(10_000.0, 1.5))
    assert row.rate_ratio == pytest.approx(0.2)
    assert row.p50_ratio == pytest.approx(6.0)
    summary = row.summary()
    assert (summary["rate_ratio"], summary["p50_ratio"]) == (0.2, 6.0)
    assert summary["direct"]["rate"] == 50_000.0


def test_table_has_one_row_per_case_and_level_with_units_ratios_and_errors() -> None:
    rows = [
        Row("GET /", 1, "req/s", _figures(8000.0, 0.12), _figures(4000.0, 0.24, errors=2)),
        Row("_bulk 10 MB", 4, "MB/s", _figures(40.0, 900.0), _figures(36.0, None)),
    ]
    lines = format_table(rows, None).splitlines()
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|")
    assert lines[2] == (
        "| GET / | 1 | 8,000.0 req/s | 0.12 | 0.12 | 4,000.0 req/s | 0.24 | 0.24 | 0.50x | "
        "2.00x | 0/2 |"
    )
    assert lines[3].startswith("| _bulk 10 MB | 4 | 40.0 MB/s |")
    assert "| 0.90x | - |" in lines[3]
    assert lines[-1].startswith("sidecar RSS: not measured")


def test_rss_line_states_idle_peak_and_their_ratio() -> None:
    mib = 1024 * 1024
    rss = RssFigures(
        pid=7,
        bulk_bytes=100 * MEGABYTE,
        idle_bytes=1000 * mib,
        before_bytes=1010 * mib,
        peak_bytes=1250 * mib,
        after_bytes=1100 * mib,
        status=200,
        reason=None,
        seconds=12.34,
    )
    assert rss.peak_ratio == 1.25
    assert format_rss(rss) == (
        "sidecar RSS: idle 1,000 MiB; 1,010 MiB before a 100 MB _bulk, peak 1,250 MiB while it "
        "streamed (1.25x idle), 1,100 MiB after; the _bulk got 200 in 12.3 s"
    )
    rejected = dataclasses.replace(rss, status=429, reason="rejected_execution_exception: full")
    assert format_rss(rejected).endswith(
        "the _bulk got 429 (rejected_execution_exception: full) in 12.3 s"
    )


@pytest.mark.parametrize("size_bytes", [10 * MEGABYTE, 4096, 1])
def test_bulk_body_stays_within_one_document_below_its_size(size_bytes: int) -> None:
    body = build_bulk_body(size_bytes)
    # Each action and source pair is well under 2,000 bytes: one more would not have fitted.
    assert 0 <= size_bytes - len(body) < 2000
    assert body.count(b"\n") % 2 == 0


def test_bulk_body_is_ndjson_index_actions_of_distinct_documents() -> None:
    body = build_bulk_body(200_000, index="scratch")
    assert body.endswith(b"\n")
    lines = body.decode().splitlines()
    actions, sources = lines[::2], [json.loads(line) for line in lines[1::2]]
    assert len(actions) == len(sources) > 100
    assert {json.loads(action)["index"]["_index"] for action in actions} == {"scratch"}
    assert [source["n"] for source in sources] == list(range(len(sources)))
    assert all(source["title"] and source["text"] for source in sources)
    assert json.loads(build_bulk_body(2000).split(b"\n")[0]) == {"index": {}}


def test_an_error_answer_is_described_by_its_type_and_reason() -> None:
    answer = {
        "error": {"type": "rejected_execution_exception", "reason": "x" * 300},
        "status": 429,
    }
    assert describe_error(json.dumps(answer).encode()) == (
        "rejected_execution_exception: " + "x" * 160
    )
    assert describe_error(b"<html>Bad Gateway</html>") == "<html>Bad Gateway</html>"
    assert describe_error(b'{"error": "no such route"}') == '{"error": "no such route"}'


def test_rss_is_read_from_the_vmrss_line_in_bytes() -> None:
    status = "Name:\tpython\nVmPeak:\t 2000000 kB\nVmRSS:\t  1048576 kB\nRssAnon:\t 900000 kB\n"
    assert read_rss_bytes(status) == 1024 * 1024 * 1024


def test_a_status_without_vmrss_is_refused() -> None:
    with pytest.raises(ValueError, match="no VmRSS"):
        read_rss_bytes("Name:\tkworker/0:1\nState:\tI (idle)\n")


def test_percentiles_of_few_bulk_sends_stay_within_the_measured_values() -> None:
    latencies_s = [1.0, 2.0, 3.0, 4.0]
    assert percentile_ms(latencies_s, 50) == 2500.0
    assert 3000.0 < (percentile_ms(latencies_s, 99) or 0) <= 4000.0
    assert percentile_ms([0.5], 99) == 500.0
    assert percentile_ms([], 50) is None
