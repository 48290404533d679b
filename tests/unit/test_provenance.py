import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from sidecar.provenance import (
    ProvenanceError,
    ProvenanceReport,
    fetch_metrics,
    format_report,
    parse_provenance,
)

# What prometheus_client serves: HELP/TYPE lines, `_created` samples beside every counter, and
# metrics the report must ignore.
METRICS_TEXT = """\
# HELP sidecar_requests_total Requests served.
# TYPE sidecar_requests_total counter
sidecar_requests_total{route="search",status="200"} 5.0
# HELP sidecar_requests_created Requests served.
# TYPE sidecar_requests_created gauge
sidecar_requests_created{route="search",status="200"} 1.7e+09
# HELP sidecar_candidates_total First-stage candidates by retriever.
# TYPE sidecar_candidates_total counter
sidecar_candidates_total{source="both"} 200.0
sidecar_candidates_total{source="lexical_only"} 120.0
sidecar_candidates_total{source="vector_only"} 80.0
# HELP sidecar_candidates_created First-stage candidates by retriever.
# TYPE sidecar_candidates_created gauge
sidecar_candidates_created{source="both"} 1.7e+09
sidecar_candidates_created{source="lexical_only"} 1.7e+09
sidecar_candidates_created{source="vector_only"} 1.7e+09
# HELP sidecar_final_hits_total Final top-k hits by retriever and first-stage rank.
# TYPE sidecar_final_hits_total counter
sidecar_final_hits_total{first_stage_rank="1-10",source="both"} 12.0
sidecar_final_hits_total{first_stage_rank="11-20",source="both"} 3.0
sidecar_final_hits_total{first_stage_rank="1-10",source="lexical_only"} 4.0
sidecar_final_hits_total{first_stage_rank="21-50",source="lexical_only"} 2.0
sidecar_final_hits_total{first_stage_rank="1-10",source="vector_only"} 2.0
sidecar_final_hits_total{first_stage_rank="101+",source="vector_only"} 1.0
sidecar_final_hits_total{first_stage_rank="51-100",source="vector_only"} 1.0
# HELP sidecar_final_hits_created Final top-k hits by retriever and first-stage rank.
# TYPE sidecar_final_hits_created gauge
sidecar_final_hits_created{first_stage_rank="1-10",source="both"} 1.7e+09
sidecar_final_hits_created{first_stage_rank="101+",source="vector_only"} 1.7e+09
# HELP sidecar_final_hits_by_score_total Final top-k hits by retriever and first-stage score.
# TYPE sidecar_final_hits_by_score_total counter
sidecar_final_hits_by_score_total{first_stage_score="0.9-1.0",source="both"} 10.0
sidecar_final_hits_by_score_total{first_stage_score="0.5-0.6",source="both"} 5.0
sidecar_final_hits_by_score_total{first_stage_score="0.0-0.1",source="lexical_only"} 6.0
sidecar_final_hits_by_score_total{first_stage_score="0.3-0.4",source="vector_only"} 4.0
# HELP sidecar_final_hits_by_score_created Final top-k hits by retriever and first-stage score.
# TYPE sidecar_final_hits_by_score_created gauge
sidecar_final_hits_by_score_created{first_stage_score="0.9-1.0",source="both"} 1.7e+09
# HELP sidecar_rank_shift First-stage rank minus final rank.
# TYPE sidecar_rank_shift histogram
sidecar_rank_shift_bucket{le="0.0"} 10.0
sidecar_rank_shift_bucket{le="+Inf"} 25.0
sidecar_rank_shift_count 25.0
sidecar_rank_shift_sum 40.0
# HELP sidecar_inflight_requests Requests being served.
# TYPE sidecar_inflight_requests gauge
sidecar_inflight_requests 0.0
"""

# Counters with labels that were never incremented: prometheus_client writes only HELP/TYPE.
EMPTY_METRICS_TEXT = """\
# HELP sidecar_final_hits_total Final top-k hits by retriever and first-stage rank.
# TYPE sidecar_final_hits_total counter
# HELP sidecar_final_hits_by_score_total Final top-k hits by retriever and first-stage score.
# TYPE sidecar_final_hits_by_score_total counter
# HELP sidecar_candidates_total First-stage candidates by retriever.
# TYPE sidecar_candidates_total counter
"""


def _row(report_text: str, *cells: str) -> bool:
    """Whether one line of the report holds exactly these cells, separated by spaces."""
    pattern = r"^\s*" + r"\s+".join(map(re.escape, cells)) + r"\s*$"
    return re.search(pattern, report_text, flags=re.MULTILINE) is not None


def _section(report_text: str, title: str) -> list[str]:
    """The lines of the table under `title`, up to the blank line that ends it."""
    block = report_text.split(f"{title}\n", 1)[1].split("\n\n", 1)[0]
    return block.splitlines()


@pytest.fixture(scope="module")
def report() -> ProvenanceReport:
    return parse_provenance(METRICS_TEXT)


def test_parse_reads_the_provenance_counters(report: ProvenanceReport) -> None:
    assert report.final_by_rank == {
        ("both", "1-10"): 12,
        ("both", "11-20"): 3,
        ("lexical_only", "1-10"): 4,
        ("lexical_only", "21-50"): 2,
        ("vector_only", "1-10"): 2,
        ("vector_only", "101+"): 1,
        ("vector_only", "51-100"): 1,
    }
    assert report.final_by_score == {
        ("both", "0.9-1.0"): 10,
        ("both", "0.5-0.6"): 5,
        ("lexical_only", "0.0-0.1"): 6,
        ("vector_only", "0.3-0.4"): 4,
    }
    assert report.candidates == {"both": 200, "lexical_only": 120, "vector_only": 80}


def test_marginals(report: ProvenanceReport) -> None:
    assert report.final_hits == 25
    assert report.final_by_source() == {"both": 15, "lexical_only": 6, "vector_only": 4}
    assert report.final_by_rank_range() == {
        "1-10": 18,
        "11-20": 3,
        "21-50": 2,
        "51-100": 1,
        "101+": 1,
    }
    assert report.final_by_score_range() == {
        "0.9-1.0": 10,
        "0.5-0.6": 5,
        "0.0-0.1": 6,
        "0.3-0.4": 4,
    }


def test_report_shares_by_retriever(report: ProvenanceReport) -> None:
    text = format_report(report)
    assert "Final top-k hits: 25" in text
    # 6/25, 4/25, 15/25
    rows = _section(text, "Final top-k by retriever")
    assert _row(rows[1], "lexical_only", "6", "24.0%")
    assert _row(rows[2], "vector_only", "4", "16.0%")
    assert _row(rows[3], "both", "15", "60.0%")


def test_report_shares_by_rank_range_in_natural_order(report: ProvenanceReport) -> None:
    rows = _section(format_report(report), "Final top-k by first-stage rank")
    # 18/25, 3/25, 2/25, 1/25, 1/25; "101+" last although it sorts before "11-20".
    expected = [
        ("1-10", "18", "72.0%"),
        ("11-20", "3", "12.0%"),
        ("21-50", "2", "8.0%"),
        ("51-100", "1", "4.0%"),
        ("101+", "1", "4.0%"),
    ]
    assert len(rows) == 1 + len(expected)
    for line, cells in zip(rows[1:], expected, strict=True):
        assert _row(line, *cells), line


def test_report_shares_by_score_range_ascending_with_empty_ranges(report: ProvenanceReport) -> None:
    rows = _section(format_report(report), "Final top-k by first-stage score (normalized)")
    assert [line.split()[0] for line in rows[1:]] == [
        "0.0-0.1",
        "0.1-0.2",
        "0.2-0.3",
        "0.3-0.4",
        "0.4-0.5",
        "0.5-0.6",
        "0.6-0.7",
        "0.7-0.8",
        "0.8-0.9",
        "0.9-1.0",
    ]
    # 6/25, 0, 4/25, 5/25, 10/25
    assert _row(rows[1], "0.0-0.1", "6", "24.0%")
    assert _row(rows[2], "0.1-0.2", "0", "0.0%")
    assert _row(rows[4], "0.3-0.4", "4", "16.0%")
    assert _row(rows[6], "0.5-0.6", "5", "20.0%")
    assert _row(rows[10], "0.9-1.0", "10", "40.0%")


def test_report_cross_table(report: ProvenanceReport) -> None:
    rows = _section(format_report(report), "Final top-k hits by retriever x first-stage rank")
    assert _row(rows[0], "retriever", "1-10", "11-20", "21-50", "51-100", "101+", "total", "share")
    assert _row(rows[1], "lexical_only", "4", "0", "2", "0", "0", "6", "24.0%")
    assert _row(rows[2], "vector_only", "2", "0", "0", "1", "1", "4", "16.0%")
    assert _row(rows[3], "both", "12", "3", "0", "0", "0", "15", "60.0%")
    assert _row(rows[4], "total", "18", "3", "2", "1", "1", "25", "100.0%")


def test_report_candidate_mix(report: ProvenanceReport) -> None:
    rows = _section(format_report(report), "First-stage candidates by retriever (400 in all)")
    # 120/400, 80/400, 200/400
    assert _row(rows[1], "lexical_only", "120", "30.0%")
    assert _row(rows[2], "vector_only", "80", "20.0%")
    assert _row(rows[3], "both", "200", "50.0%")


def test_report_tables_are_aligned(report: ProvenanceReport) -> None:
    # Numbers are right-aligned, so every line of a table ends in the same column.
    for block in format_report(report).strip().split("\n\n")[1:]:
        lines = block.splitlines()[1:]
        assert len({len(line) for line in lines}) == 1, block


def test_unknown_label_values_come_after_the_known_ones() -> None:
    text = format_report(
        parse_provenance(
            'sidecar_final_hits_total{first_stage_rank="1-10",source="neither"} 1.0\n'
            'sidecar_final_hits_total{first_stage_rank="1-10",source="both"} 3.0\n'
        )
    )
    rows = _section(text, "Final top-k by retriever")
    assert [line.split()[0] for line in rows[1:]] == [
        "lexical_only",
        "vector_only",
        "both",
        "neither",
    ]
    assert _row(rows[4], "neither", "1", "25.0%")


@pytest.mark.parametrize("metrics_text", ["", EMPTY_METRICS_TEXT])
def test_report_without_final_hits_says_so(metrics_text: str) -> None:
    report = parse_provenance(metrics_text)
    assert report == ProvenanceReport()
    assert report.final_hits == 0
    text = format_report(report)
    assert text.startswith("No final hits recorded yet")
    assert "No first-stage candidates recorded yet." in text
    assert "%" not in text


def test_intercepted_searches_are_counted_apart_and_the_report_says_so() -> None:
    report = parse_provenance(
        'sidecar_requests_total{route="intercept",status="200"} 3.0\n'
        'sidecar_requests_total{route="intercept",status="400"} 2.0\n'
        'sidecar_requests_total{route="search",status="200"} 5.0\n'
        'sidecar_final_hits_total{first_stage_rank="1-10",source="both"} 4.0\n'
    )
    assert report.intercepted_searches == 3
    assert report.final_hits == 4
    headline = format_report(report).split("\n\n")[0]
    assert "Intercepted _search + ext.rerank answers: 3, in none of the tables" in headline


def test_parse_reads_prometheus_client_output() -> None:
    registry = CollectorRegistry()
    final_hits = Counter(
        "sidecar_final_hits", "h", ["source", "first_stage_rank"], registry=registry
    )
    candidates = Counter("sidecar_candidates", "c", ["source"], registry=registry)
    final_hits.labels(source="both", first_stage_rank="1-10").inc(7)
    final_hits.labels(source="vector_only", first_stage_rank="101+").inc()
    candidates.labels(source="lexical_only").inc(30)

    report = parse_provenance(generate_latest(registry).decode())

    assert report.final_by_rank == {("both", "1-10"): 7, ("vector_only", "101+"): 1}
    assert report.candidates == {"lexical_only": 30}


def test_parse_rejects_text_that_is_not_an_exposition() -> None:
    with pytest.raises(ProvenanceError, match="not a Prometheus text exposition"):
        parse_provenance('sidecar_final_hits_total{source="both" 3\n')


class _MetricsHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/metrics" or self.path == "/custom/metrics":
            body = METRICS_TEXT.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output clean


@pytest.fixture(scope="module")
def metrics_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _MetricsHandler)
    # A short poll interval so that shutdown() returns at once.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("suffix", ["", "/", "/metrics"])
def test_fetch_metrics_appends_the_metrics_path(metrics_server: str, suffix: str) -> None:
    assert fetch_metrics(metrics_server + suffix) == METRICS_TEXT


def test_fetch_metrics_keeps_an_explicit_path(metrics_server: str) -> None:
    assert fetch_metrics(f"{metrics_server}/custom/metrics") == METRICS_TEXT


def test_fetch_metrics_assumes_http_without_a_scheme(metrics_server: str) -> None:
    assert fetch_metrics(metrics_server.removeprefix("http://")) == METRICS_TEXT


def test_fetch_metrics_names_the_url_on_an_error_status(metrics_server: str) -> None:
    url = f"{metrics_server}/elsewhere"
    with pytest.raises(ProvenanceError, match=re.escape(url)) as raised:
        fetch_metrics(url)
    assert "HTTP 404" in str(raised.value)


def test_fetch_metrics_names_the_url_when_nothing_listens() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(ProvenanceError, match=re.escape(f"{url}/metrics")):
        fetch_metrics(url, timeout_s=5.0)


@pytest.mark.parametrize("url", ["ftp://example.org/metrics", "http://", "http://host:port"])
def test_fetch_metrics_refuses_urls_it_cannot_fetch(url: str) -> None:
    with pytest.raises(ProvenanceError, match=re.escape(url)):
        fetch_metrics(url)
