"""A fuzz corpus against the real sidecar and the real node: generated `/v1/search` bodies and
intercepted `_search` bodies, valid and not (wrong types, huge and odd numbers, unpaired
surrogates, unknown fields, broken JSON, compressed and mislabelled bodies). Every answer must
come within the deadline, no 5xx unless the cluster itself gives one for the same request, and
every 4xx in OpenSearch's error shape. Seeds are fixed; the count and the status histogram are
printed."""

from __future__ import annotations

import gzip
import json
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from sidecar.embedding import BiEncoder
from tests.integration.conftest import Cluster
from tests.integration.sidecar_server import RunningSidecar, running_sidecar

pytestmark = pytest.mark.integration

CASES_PER_ROUTE = 500
DEADLINE_S = 10.0
MARGIN_S = 5.0
INDEX = "test-pydoc"

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    # Any code point, unpaired surrogates included (json.dumps escapes them as \\udXXX).
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
texts = st.one_of(
    st.sampled_from(["exception handling", "with statement", "  "]), st.text(max_size=60)
)


def field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value, sometimes anything at all."""
    return st.one_of(valid, valid, values)


native_bodies = st.fixed_dictionaries(
    {"index": st.one_of(st.just(INDEX), st.just(INDEX), values), "query": field(texts)},
    optional={
        "k": field(st.integers(min_value=-2, max_value=300)),
        "candidates": field(st.integers(min_value=-2, max_value=2000)),
        "fusion": field(st.sampled_from(["convex", "rrf", "server", "magic"])),
        "weights": field(st.lists(st.floats(min_value=-1, max_value=2), max_size=3)),
        "rerank": field(st.booleans()),
        "truncation": field(st.sampled_from(["first", "max_chunk", "middle"])),
        "explain": field(st.booleans()),
        "rerank_cache": field(st.booleans()),
        "filter": field(
            st.fixed_dictionaries({"term": st.fixed_dictionaries({"metadata.topic": texts})})
        ),
        "document_fields": field(
            st.lists(st.sampled_from(["title", "text", "", "a..b"]), max_size=3)
        ),
        "unknown": values,
    },
)
queries = st.one_of(
    st.fixed_dictionaries({"match": st.fixed_dictionaries({"text": field(texts)})}),
    st.fixed_dictionaries({"multi_match": st.fixed_dictionaries({"query": field(texts)})}),
    values,
)
intercepted_bodies = st.fixed_dictionaries(
    {
        "query": queries,
        "ext": st.fixed_dictionaries(
            {
                "rerank": field(
                    st.fixed_dictionaries(
                        {
                            "query_context": field(
                                st.fixed_dictionaries({"query_text": field(texts)})
                            )
                        },
                        optional={
                            "window": field(st.integers(min_value=-1, max_value=3000)),
                            "document_fields": field(st.lists(st.sampled_from(["title", "text"]))),
                        },
                    )
                )
            }
        ),
    },
    optional={
        "size": field(st.integers(min_value=-1, max_value=3000)),
        "from": field(st.integers(min_value=-1, max_value=100)),
        "_source": field(st.one_of(st.booleans(), st.lists(st.sampled_from(["title", "text"])))),
    },
)


@st.composite
def wire(draw: st.DrawFn, bodies: st.SearchStrategy[Any]) -> tuple[bytes, dict[str, str]]:
    """A body as it goes on the wire: mostly JSON, sometimes cut, gzipped, mislabelled, or bytes."""
    raw = json.dumps(draw(bodies)).encode()
    headers = {"Content-Type": "application/json"}
    form = draw(st.sampled_from(["json"] * 6 + ["cut", "gzip", "fake_gzip", "text_plain", "bytes"]))
    if form == "cut":
        raw = raw[: draw(st.integers(min_value=0, max_value=max(0, len(raw) - 1)))]
    elif form == "gzip":
        raw, headers["Content-Encoding"] = gzip.compress(raw), "gzip"
    elif form == "fake_gzip":
        headers["Content-Encoding"] = "gzip"
    elif form == "text_plain":
        headers["Content-Type"] = "text/plain"
    elif form == "bytes":
        raw = draw(st.binary(max_size=200))
    return raw, headers


def send(url: str, raw: bytes, headers: dict[str, str]) -> tuple[int, bytes, float]:
    started = time.monotonic()
    request = urllib.request.Request(url, data=raw, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=DEADLINE_S + MARGIN_S) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            status, body = error.code, error.read()
    return status, body, time.monotonic() - started


def check_answer(status: int, body: bytes, elapsed_s: float) -> None:
    assert elapsed_s < DEADLINE_S + MARGIN_S, f"answered after {elapsed_s:.1f} s"
    if 400 <= status < 500:
        answer = json.loads(body)
        assert answer["status"] == status, answer
        error = answer["error"]
        # OpenSearch's own 406 has the reason as the whole `error`.
        assert isinstance(error, str) or isinstance(error["type"], str), answer


@pytest.fixture(scope="module")
def fuzzed_sidecar(
    opensearch: Cluster, encoder: BiEncoder, tiny_cross_encoder: Path, pydoc_index: str
) -> Iterator[RunningSidecar]:
    with running_sidecar(
        opensearch.url,
        tiny_cross_encoder,
        encoder,
        request_timeout_s=DEADLINE_S,
        max_candidates=200,
    ) as server:
        yield server


def report(capsys: pytest.CaptureFixture[str], route: str, statuses: Counter[int]) -> None:
    with capsys.disabled():
        histogram = ", ".join(f"{status}: {count}" for status, count in sorted(statuses.items()))
        print(f"\nfuzz {route}: {sum(statuses.values())} cases; statuses {histogram}")


def test_generated_native_searches_never_get_a_5xx(
    fuzzed_sidecar: RunningSidecar, capsys: pytest.CaptureFixture[str]
) -> None:
    statuses: Counter[int] = Counter()

    @seed(20261201)
    @settings(
        max_examples=CASES_PER_ROUTE,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(wire(native_bodies))
    def case(sent: tuple[bytes, dict[str, str]]) -> None:
        status, body, elapsed_s = send(f"{fuzzed_sidecar.url}/v1/search", *sent)
        statuses[status] += 1
        assert status < 500, body[:500]
        check_answer(status, body, elapsed_s)

    case()
    report(capsys, "/v1/search", statuses)
    assert statuses[200] > 0, "some generated searches are valid"


def test_generated_intercepted_searches_get_no_5xx_the_cluster_would_not_give(
    fuzzed_sidecar: RunningSidecar, opensearch: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    statuses: Counter[int] = Counter()

    @seed(20261202)
    @settings(
        max_examples=CASES_PER_ROUTE,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(wire(intercepted_bodies))
    def case(sent: tuple[bytes, dict[str, str]]) -> None:
        raw, headers = sent
        status, body, elapsed_s = send(f"{fuzzed_sidecar.url}/{INDEX}/_search", raw, headers)
        statuses[status] += 1
        if status >= 500:
            # Only as the cluster itself answers the same search without `ext.rerank`.
            direct, _, _ = send(f"{opensearch.url}/{INDEX}/_search", _without_ext(raw), headers)
            assert direct >= 500, body[:500]
        check_answer(status, body, elapsed_s)

    case()
    report(capsys, f"/{INDEX}/_search", statuses)
    assert statuses[200] > 0, "some generated searches are valid"


def _without_ext(raw: bytes) -> bytes:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return raw
    if isinstance(body, dict):
        body.pop("ext", None)
    return json.dumps(body).encode()
