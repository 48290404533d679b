"""SigV4 service mode: the sidecar signs every upstream call as its own AWS identity. No AWS
endpoint is reachable here, so a front between the sidecar and the real node checks each
signature as AWS does — recomputed from the request it received, with the same secret, over the
signed headers, the path, the query and the body's hash — and refuses a bad one with 403."""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from sidecar.embedding import BiEncoder
from tests.integration.conftest import Cluster
from tests.integration.sidecar_server import running_sidecar
from tests.integration.test_identity import RecordingProxy
from tests.integration.test_sidecar import QUERY, post

pytestmark = pytest.mark.integration

ACCESS_KEY, SECRET_KEY, REGION = "AKIDSIDECARTEST", "sidecar-test-secret-key", "eu-west-1"
_AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/"
    r"(?P<service>[^/]+)/aws4_request, SignedHeaders=(?P<signed>[^,]+), Signature=(?P<sig>[0-9a-f]+)"
)


class VerifyingFront(RecordingProxy):
    """Forwards a request to the node only when its SigV4 signature is valid for the test
    credentials, region and service `es`; answers 403 otherwise."""

    def __init__(self, target: str) -> None:
        self.verified = 0
        self.refused: list[str] = []
        super().__init__(target)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        problem = _signature_problem(request, body)
        if problem is not None:
            self.refused.append(f"{request.method} {request.path}: {problem}")
            return web.json_response({"message": problem}, status=403)
        self.verified += 1
        return await super()._handle(request)


def _signature_problem(request: web.Request, body: bytes) -> str | None:
    match = _AUTHORIZATION.fullmatch(request.headers.get("Authorization", ""))
    if match is None:
        return "missing or malformed SigV4 Authorization"
    if (match["key"], match["region"], match["service"]) != (ACCESS_KEY, REGION, "es"):
        return "wrong credential scope"
    if request.headers.get("X-Amz-Content-SHA256") != hashlib.sha256(body).hexdigest():
        return "x-amz-content-sha256 does not match the body"
    signed = match["signed"].split(";")
    if not {"host", "x-amz-date", "x-amz-content-sha256"} <= set(signed):
        return f"host, date and body hash must be signed, got {signed}"
    stamp = request.headers["X-Amz-Date"]
    age = datetime.datetime.now(datetime.UTC) - datetime.datetime.strptime(
        stamp, "%Y%m%dT%H%M%SZ"
    ).replace(tzinfo=datetime.UTC)
    if abs(age) > datetime.timedelta(minutes=5):
        return "signature expired"
    # As AWS does: the query decoded and re-encoded strictly (RFC 3986, %20 for a space).
    query = "&".join(
        f"{quote(key, safe='-_.~')}={quote(value, safe='-_.~')}"
        for key, value in sorted(request.query.items())
    )
    rebuilt = AWSRequest(
        method=request.method,
        url=f"http://{request.host}{request.raw_path.split('?')[0]}"
        + (f"?{query}" if query else ""),
        data=body,
        headers={name: request.headers[name] for name in signed if name != "host"},
    )
    rebuilt.context["timestamp"] = stamp
    auth = SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "es", REGION)
    expected = auth.signature(
        auth.string_to_sign(rebuilt, auth.canonical_request(rebuilt)), rebuilt
    )
    return None if expected == match["sig"] else "the request signature does not match"


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The sidecar's AWS identity from the environment, as on a pod with static keys; no
    credential files and no instance metadata lookups."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "absent-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def front(opensearch: Cluster) -> Iterator[VerifyingFront]:
    verifying = VerifyingFront(opensearch.url)
    yield verifying
    verifying.stop()


def test_every_call_is_signed_as_the_sidecar_and_callers_credentials_never_pass(
    aws_credentials: None,
    front: VerifyingFront,
    encoder: BiEncoder,
    tiny_cross_encoder: Path,
    pydoc_index: str,
) -> None:
    caller = {"Authorization": "Basic Y2FsbGVyOnB3"}
    with running_sidecar(
        front.url,
        tiny_cross_encoder,
        encoder,
        upstream_identity="service",
        service_aws_region=REGION,
    ) as server:
        with urllib.request.urlopen(f"{server.url}/readyz", timeout=30) as ready:
            assert ready.status == 200
        status, answer, _ = post(
            f"{server.url}/v1/search",
            {"index": pydoc_index, "query": QUERY, "k": 3, "candidates": 10},
            caller,
        )
        assert status == 200, answer
        status, answer, _ = post(
            f"{server.url}/{pydoc_index}/_search?size=3",
            {
                "query": {"match": {"text": "exception"}},
                "ext": {"rerank": {"query_context": {"query_text": QUERY}, "window": 5}},
            },
            caller,
        )
        assert status == 200, answer
        status, counted, _ = post(
            f"{server.url}/{pydoc_index}/_count",
            {"query": {"match": {"text": "exception"}}},
            caller,
        )
        assert status == 200, counted
        # A query string with characters SigV4 encodes (a space, a colon), through the pass-through.
        status, found, _ = post(
            f"{server.url}/{pydoc_index}/_search?q=text:exception%20OR%20text:error&size=2",
            {},
            caller,
        )
        assert status == 200, found
        assert found["hits"]["hits"]
        status, written, _ = post(
            f"{server.url}/{pydoc_index}/_doc/sigv4-probe?refresh=true",
            {"title": "Signed", "text": "written through a signing sidecar"},
            caller,
        )
        assert status == 201, written
        request = urllib.request.Request(
            f"{server.url}/{pydoc_index}/_doc/sigv4-probe", method="DELETE", headers=caller
        )
        with urllib.request.urlopen(request, timeout=30) as deleted:
            assert deleted.status == 200
    assert front.refused == []
    paths = {path for _, path, _ in front.seen}
    assert {"/_msearch", f"/{pydoc_index}/_mapping", f"/{pydoc_index}/_count"} <= paths
    assert front.verified == len(front.seen)
    for _, _, headers in front.seen:
        assert headers["Authorization"].startswith("AWS4-HMAC-SHA256 ")
        assert caller["Authorization"] not in headers.getall("Authorization")


def test_the_front_refuses_a_forged_or_altered_request(front: VerifyingFront) -> None:
    """The check above can fail: a request whose body changed after signing is refused."""
    auth = SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "es", REGION)
    host = front.url.removeprefix("http://")
    signed = AWSRequest(
        method="POST",
        url=f"{front.url}/_count",
        data=b"{}",
        headers={
            "Content-Type": "application/json",
            "X-Amz-Content-SHA256": hashlib.sha256(b"{}").hexdigest(),
        },
    )
    auth.add_auth(signed)
    headers = dict(signed.headers.items()) | {"Host": host}
    for body in (b"{}", b'{"query": {"match_all": {}}}'):
        sent = {**headers, "X-Amz-Content-SHA256": hashlib.sha256(body).hexdigest()}
        request = urllib.request.Request(f"{front.url}/_count", data=body, headers=sent)
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                status = answer.status
        except urllib.error.HTTPError as error:
            status = error.code
            json.loads(error.read())
        assert status == (200 if body == b"{}" else 403)
    assert len(front.refused) == 1
    assert "signature does not match" in front.refused[0]
