"""`sidecar provenance`: where a running sidecar's final hits came from, read off its `/metrics`.

Off the request path: an operator's report built from the provenance counters the pipeline exports
(`sidecar_final_hits_total`, `sidecar_final_hits_by_score_total`, `sidecar_candidates_total`) for
native searches, and the count of intercepted `_search` answers, which those counters leave out."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from prometheus_client.parser import text_string_to_metric_families

# Label values in their natural order; values the sidecar may add later are listed after these.
SOURCES = ("lexical_only", "vector_only", "both")
RANK_RANGES = ("1-10", "11-20", "21-50", "51-100", "101+")
SCORE_RANGES = tuple(f"{i / 10:.1f}-{(i + 1) / 10:.1f}" for i in range(10))

_FINAL_HITS = "sidecar_final_hits_total"
_FINAL_HITS_BY_SCORE = "sidecar_final_hits_by_score_total"
_CANDIDATES = "sidecar_candidates_total"
_REQUESTS = "sidecar_requests_total"
_MISSING_LABEL = "unknown"


class ProvenanceError(RuntimeError):
    """The metrics could not be fetched or are not a Prometheus text exposition."""


@dataclass(frozen=True)
class ProvenanceReport:
    """Counter values since the sidecar started (counts of hits, not rates).

    `final_by_rank` maps (source, first-stage rank range) and `final_by_score` maps
    (source, first-stage score range) to final top-k hits of native searches; `candidates` maps
    source to their first-stage candidates. Absent keys are zero. `intercepted_searches` counts
    the reranked answers to `_search` + `ext.rerank`: their candidates are the hits of the
    caller's own query, which no retriever label describes, so they are in none of the maps.
    """

    final_by_rank: Mapping[tuple[str, str], int] = field(default_factory=dict)
    final_by_score: Mapping[tuple[str, str], int] = field(default_factory=dict)
    candidates: Mapping[str, int] = field(default_factory=dict)
    intercepted_searches: int = 0

    @property
    def final_hits(self) -> int:
        """Final top-k hits recorded, from `sidecar_final_hits_total`."""
        return sum(self.final_by_rank.values())

    def final_by_source(self) -> dict[str, int]:
        """Final hits per retriever (source)."""
        return _marginal(self.final_by_rank, 0)

    def final_by_rank_range(self) -> dict[str, int]:
        """Final hits per first-stage rank range."""
        return _marginal(self.final_by_rank, 1)

    def final_by_score_range(self) -> dict[str, int]:
        """Final hits per normalized first-stage score range."""
        return _marginal(self.final_by_score, 1)


def parse_provenance(metrics_text: str) -> ProvenanceReport:
    """Read the provenance counters from a Prometheus text exposition (what `/metrics` serves).

    `_created` samples and every other metric are ignored; a sample lacking a label is counted
    under "unknown". Raises ProvenanceError when the text is not a valid exposition.
    """
    final_by_rank: dict[tuple[str, str], int] = {}
    final_by_score: dict[tuple[str, str], int] = {}
    candidates: dict[str, int] = {}
    intercepted = 0
    try:
        for family in text_string_to_metric_families(metrics_text):
            for sample in family.samples:
                labels = sample.labels
                source = labels.get("source", _MISSING_LABEL)
                count = round(sample.value)
                if sample.name == _FINAL_HITS:
                    key = (source, labels.get("first_stage_rank", _MISSING_LABEL))
                    final_by_rank[key] = final_by_rank.get(key, 0) + count
                elif sample.name == _FINAL_HITS_BY_SCORE:
                    key = (source, labels.get("first_stage_score", _MISSING_LABEL))
                    final_by_score[key] = final_by_score.get(key, 0) + count
                elif sample.name == _CANDIDATES:
                    candidates[source] = candidates.get(source, 0) + count
                elif (
                    sample.name == _REQUESTS
                    and labels.get("route") == "intercept"
                    and labels.get("status", "").startswith("2")
                ):
                    intercepted += count
    except (ValueError, OverflowError) as exc:  # the parser's error; round() of inf/NaN
        raise ProvenanceError(f"not a Prometheus text exposition: {exc}") from exc
    return ProvenanceReport(
        final_by_rank=final_by_rank,
        final_by_score=final_by_score,
        candidates=candidates,
        intercepted_searches=intercepted,
    )


def format_report(report: ProvenanceReport) -> str:
    """Plain-text tables of counts and shares of native searches: final top-k by retriever, by
    first-stage rank range, by first-stage score range, retriever x rank range, then the
    candidate mix. The first lines say how many intercepted `_search` answers they leave out.

    Ranges come in their natural order. Says so plainly when no final hit was recorded yet.
    """
    intercepted = (
        f"Intercepted _search + ext.rerank answers: {report.intercepted_searches}, in none of "
        "the tables (their candidates are the hits of the caller's own query, not of the "
        "sidecar's retrievers)."
    )
    sections: list[str] = []
    if report.final_hits == 0:
        sections.append(
            "No final hits recorded yet: this sidecar has served no native search (/v1/search) "
            f"since it started (sidecar_final_hits_total is absent or zero).\n{intercepted}"
        )
    else:
        sections.append(
            f"Final top-k hits: {report.final_hits}, of native searches (/v1/search)\n"
            + intercepted
        )
        sections.append(
            _share_table(
                "Final top-k by retriever", "retriever", "hits", report.final_by_source(), SOURCES
            )
        )
        sections.append(
            _share_table(
                "Final top-k by first-stage rank",
                "rank",
                "hits",
                report.final_by_rank_range(),
                RANK_RANGES,
            )
        )
        by_score = report.final_by_score_range()
        if sum(by_score.values()) > 0:
            sections.append(
                _share_table(
                    "Final top-k by first-stage score (normalized)",
                    "score",
                    "hits",
                    by_score,
                    SCORE_RANGES,
                )
            )
        sections.append(_cross_table(report.final_by_rank))
    if sum(report.candidates.values()) > 0:
        sections.append(
            _share_table(
                f"First-stage candidates by retriever ({sum(report.candidates.values())} in all)",
                "retriever",
                "candidates",
                report.candidates,
                SOURCES,
            )
        )
    else:
        sections.append("No first-stage candidates recorded yet.")
    return "\n\n".join(sections) + "\n"


def fetch_metrics(
    url: str, timeout_s: float = 10.0, headers: Mapping[str, str] | None = None
) -> str:
    """GET a sidecar's metrics text. `url` is http(s)://host:port[/path]; without a path (or
    with "/") `/metrics` is appended, and without a scheme http:// is assumed.

    Raises ProvenanceError naming the URL on any failure: unreachable, timeout after `timeout_s`
    seconds, an error status, or a body that is not UTF-8.
    """
    target = _metrics_url(url)
    try:
        request = urllib.request.Request(target, headers=dict(headers or {}))
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body: bytes = response.read()
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the response; left open it would warn when collected
        raise ProvenanceError(f"cannot fetch metrics from {target}: HTTP {exc.code}") from exc
    except urllib.error.URLError as exc:
        raise ProvenanceError(f"cannot fetch metrics from {target}: {exc.reason}") from exc
    except (TimeoutError, OSError) as exc:
        raise ProvenanceError(f"cannot fetch metrics from {target}: {exc}") from exc
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProvenanceError(f"metrics from {target} are not UTF-8 text") from exc


def _metrics_url(url: str) -> str:
    if "://" not in url:
        url = f"http://{url}"
    parts = urlsplit(url)
    try:
        _ = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise ProvenanceError(f"not a valid URL: {url}: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProvenanceError(f"not an http(s) URL: {url}")
    path = parts.path if parts.path not in ("", "/") else "/metrics"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _marginal(counts: Mapping[tuple[str, str], int], axis: int) -> dict[str, int]:
    totals: dict[str, int] = {}
    for key, count in counts.items():
        totals[key[axis]] = totals.get(key[axis], 0) + count
    return totals


def _ordered(known: Sequence[str], present: Iterable[str]) -> list[str]:
    """The known values in their order, then any others present, sorted."""
    return [*known, *sorted(set(present) - set(known))]


def _share_table(
    title: str, key_header: str, count_header: str, counts: Mapping[str, int], known: Sequence[str]
) -> str:
    total = sum(counts.values())
    rows = [
        [key, str(counts.get(key, 0)), _percent(counts.get(key, 0), total)]
        for key in _ordered(known, counts)
    ]
    return f"{title}\n" + _render([key_header, count_header, "share"], rows)


def _cross_table(final_by_rank: Mapping[tuple[str, str], int]) -> str:
    sources = _ordered(SOURCES, (source for source, _ in final_by_rank))
    ranges = _ordered(RANK_RANGES, (rank for _, rank in final_by_rank))
    total = sum(final_by_rank.values())
    rows: list[list[str]] = []
    for source in sources:
        cells = [final_by_rank.get((source, rank), 0) for rank in ranges]
        rows.append([source, *map(str, cells), str(sum(cells)), _percent(sum(cells), total)])
    column_totals = [sum(final_by_rank.get((s, rank), 0) for s in sources) for rank in ranges]
    rows.append(["total", *map(str, column_totals), str(total), _percent(total, total)])
    header = ["retriever", *ranges, "total", "share"]
    return "Final top-k hits by retriever x first-stage rank\n" + _render(header, rows)


def _percent(count: int, total: int) -> str:
    return f"{100 * count / total:.1f}%"


def _render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned first column, right-aligned numbers, two spaces between columns."""
    table = [list(header), *map(list, rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        ).rstrip()
        for row in table
    ]
    return "\n".join("  " + line for line in lines)
