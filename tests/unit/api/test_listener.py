import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from sidecar.api.listener import ListenerRunner

# Only a guard against hangs; every case here answers and closes at once.
HANG_GUARD_S = 5.0
# What the test requests carry where the parser chokes; an answer must not echo it.
MARKER = b"MARKER"
MAX_FIELD_SIZE = 8190  # aiohttp's default for a header line

MALFORMED = {
    "bad request line": MARKER + b" NOT HTTP AT ALL\r\n\r\n",
    "bad HTTP version": b"GET /" + MARKER + b" HTTP/9.x\r\nHost: x\r\n\r\n",
    "header name with a control character": b"GET / HTTP/1.1\r\nHost: x\r\nX-"
    + MARKER
    + b"\x01: y\r\n\r\n",
    "header value with a NUL": b"GET / HTTP/1.1\r\nHost: x\r\nX-Value: " + MARKER + b"\x00\r\n\r\n",
    "header longer than max_field_size": b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: "
    + MARKER * (MAX_FIELD_SIZE // len(MARKER) + 1)
    + b"\r\n\r\n",
    "bad chunk size": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    + MARKER
    + b"\r\n{}\r\n0\r\n\r\n",
    "Content-Length not a number": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc"
    + MARKER
    + b"\r\n\r\n{}",
    "TLS on the plain port": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + MARKER,
    **{
        f"random bytes {seed}": bytes([0x01]) + random.Random(seed).randbytes(512) + MARKER
        for seed in range(3)
    },
}


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def guarded() -> None:
        await asyncio.wait_for(test(), HANG_GUARD_S)

    asyncio.run(guarded())


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def echo_length(request: web.Request) -> web.Response:
    return web.json_response({"bytes": len(await request.read())})


async def fail(request: web.Request) -> web.Response:
    raise RuntimeError("a secret from the stack")


def trivial_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/fail", fail)
    app.router.add_route("*", "/{tail:.*}", echo_length)
    return app


@asynccontextmanager
async def listening(app: web.Application, **options: Any) -> AsyncIterator[int]:
    """The app behind the sidecar's runner on 127.0.0.1; yields the port."""
    runner = ListenerRunner(app, access_log=None, **options)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def exchange(port: int, raw: bytes) -> Answer:
    """Send `raw` and read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        received = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return Answer(int(status_line.split()[1]), {k.lower(): v for k, v in headers.items()}, body)


def assert_opensearch_error(answer: Answer, status: int, error_type: str) -> dict[str, Any]:
    assert answer.status == status, answer
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.headers["connection"] == "close"
    error: dict[str, Any] = json.loads(answer.body)
    assert error["status"] == status
    assert error["error"]["type"] == error_type
    assert error["error"]["root_cause"] == [
        {"type": error_type, "reason": error["error"]["reason"]}
    ]
    assert "Traceback" not in error["error"]["reason"]
    return error


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_request_the_parser_refuses_gets_a_400_in_opensearch_error_shape(raw: bytes) -> None:
    async def test() -> None:
        async with listening(trivial_app()) as port:
            answer = await exchange(port, raw)
        error = assert_opensearch_error(answer, 400, "illegal_argument_exception")
        assert error["error"]["reason"].startswith("malformed HTTP request: ")
        assert MARKER not in answer.body, "the offending bytes are not echoed"

    run(test)


def test_the_reason_is_the_parsers_short_description() -> None:
    async def test() -> None:
        async with listening(trivial_app()) as port:
            long_header = await exchange(port, MALFORMED["header longer than max_field_size"])
            bad_chunk = await exchange(port, MALFORMED["bad chunk size"])
        assert json.loads(long_header.body)["error"]["reason"] == (
            f"malformed HTTP request: Got more than {MAX_FIELD_SIZE} bytes when reading "
            "a request line or header"
        )
        assert json.loads(bad_chunk.body)["error"]["reason"] == (
            "malformed HTTP request: Invalid character in chunk size"
        )

    run(test)


def test_a_handler_failure_aiohttp_answers_itself_is_a_500_without_its_details() -> None:
    """The sidecar's edge middleware turns failures into answers; should one escape it, aiohttp's
    own 500 is in the same shape and carries no traceback, even in debug mode."""

    async def test() -> None:
        app = trivial_app()
        async with listening(app, debug=True) as port:
            answer = await exchange(port, b"GET /fail HTTP/1.1\r\nHost: x\r\n\r\n")
        assert_opensearch_error(answer, 500, "internal_error")
        assert b"secret" not in answer.body

    run(test)


def test_well_formed_requests_are_served_and_handler_options_reach_aiohttp() -> None:
    """The runner rebuilds aiohttp's server with its own protocol class: the handler options
    (here a short keep-alive) must still arrive, or the idle connection would stay open."""

    async def test() -> None:
        async with listening(trivial_app(), keepalive_timeout=0.1) as port:
            answer = await exchange(
                port, b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
            )
        assert answer.status == 200
        assert json.loads(answer.body) == {"bytes": 2}
        assert "connection" not in answer.headers, "kept alive until the idle timeout closed it"

    run(test)


def test_cleanup_finishes_the_request_in_flight_refuses_new_ones_then_cleans_up() -> None:
    """What `serve` does on SIGTERM: the listener closes at once, the request in flight is
    answered in full (telling its keep-alive client that the connection closes), and only then
    does the app's cleanup run."""

    async def test() -> None:
        handling, release = asyncio.Event(), asyncio.Event()
        cleaned_up: list[bool] = []

        async def slow(request: web.Request) -> web.Response:
            handling.set()
            await release.wait()
            return web.json_response({"finished": True})

        async def services(app: web.Application) -> AsyncIterator[None]:
            yield
            cleaned_up.append(True)

        app = web.Application()
        app.router.add_get("/slow", slow)
        app.cleanup_ctx.append(services)
        runner = ListenerRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        in_flight = asyncio.create_task(exchange(port, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"))
        await handling.wait()
        cleanup = asyncio.create_task(runner.cleanup())
        await asyncio.sleep(0)  # the cleanup's first step, which stops the listener
        assert not runner.sites
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        assert not cleaned_up, "cleanup waits for the request in flight"
        release.set()
        answer = await in_flight
        await cleanup
        assert answer.status == 200
        assert json.loads(answer.body) == {"finished": True}
        assert answer.headers["connection"] == "close"
        assert cleaned_up

    run(test)
