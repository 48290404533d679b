"""The HTTP listener, in front of every route: aiohttp's server with the requests its parser
refuses answered in OpenSearch's error shape, and `serve`, which runs the app until SIGTERM or
SIGINT and then drains it."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import ssl
from collections.abc import Coroutine
from typing import Any, TypedDict

from aiohttp import web
from aiohttp.http import HttpProcessingError
from aiohttp.http_exceptions import LineTooLong

from sidecar.api.errors import ApiError, error_response
from sidecar.api.routes import METRICS_APP
from sidecar.config import Settings, SettingsError
from sidecar.retrieval.tls import TlsError, server_context

log = logging.getLogger(__name__)

# Where aiohttp's parsers start quoting the offending input: after a blank line (llhttp's
# messages) or as a Python repr (the pure-Python parser's, and LineTooLong's in both).
_QUOTED_INPUT = re.compile(r"\n\n|\s(?:b|bytearray\(b)?['\"]")
# The description before the quote is short; this bounds what a future aiohttp might put there.
_MAX_REASON_CHARS = 120
_SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ListenerOptions(TypedDict):
    keepalive_timeout: float
    lingering_time: float


def listener_options(settings: Settings) -> ListenerOptions:
    """aiohttp's connection handling for the listener: idle keep-alive bounded, and after an
    answer sent before the request body was read (413, 408), the rest is drained for at most
    a second before the connection is closed (aiohttp's default is 10 s)."""
    return ListenerOptions(
        keepalive_timeout=settings.listen_keepalive_timeout_s, lingering_time=1.0
    )


def listener_tls(settings: Settings) -> ssl.SSLContext | None:
    """The listener's HTTPS context, or None for plain HTTP. Raises SettingsError for bad files."""
    if settings.listen_tls_cert is None or settings.listen_tls_key is None:
        return None
    try:
        return server_context(settings.listen_tls_cert, settings.listen_tls_key)
    except TlsError as error:
        raise SettingsError(str(error)) from None


def _refusal(status: int, error: BaseException | None) -> ApiError:
    """The answer for a request that aiohttp refuses before (or instead of) the application: a
    malformed request gets the parser's own short description, never the bytes it quotes; any
    other failure a generic reason (the details are in the log). The connection is closed."""
    close = {"Connection": "close"}
    if isinstance(error, HttpProcessingError):
        return ApiError(status, "illegal_argument_exception", _parser_reason(error), close)
    return ApiError(status, "internal_error", "the sidecar failed to answer; see its log", close)


def _parser_reason(error: HttpProcessingError) -> str:
    quoted = _QUOTED_INPUT.search(error.message)
    description = " ".join(error.message[: quoted.start() if quoted else None].split()).rstrip(":")
    if isinstance(error, LineTooLong):
        description += " a request line or header"
    return f"malformed HTTP request: {description or 'unparseable'}"[:_MAX_REASON_CHARS]


class _OpenSearchErrorHandler(web.RequestHandler):
    """aiohttp's per-connection protocol; only the body of its own error answers differs."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own logs the failure and raises ConnectionError when part of an answer went
        # out already; its plain-text answer is replaced.
        super().handle_error(request, status, exc, message)
        return error_response(_refusal(status, exc))


class _OpenSearchErrorServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        # aiohttp's Server.__call__ (private `_loop`, `_kwargs`) with the protocol class replaced;
        # its fallback for handler arguments it does not know is not needed for aiohttp's own.
        return _OpenSearchErrorHandler(self, loop=self._loop, **self._kwargs)


class ListenerRunner(web.AppRunner):
    """aiohttp's AppRunner (same arguments) whose server answers parser refusals, and any other
    error aiohttp answers itself, in OpenSearch's error shape. While `cleanup` drains, answers
    say `Connection: close`, so that keep-alive clients do not send into a closing connection.
    It adds an `on_response_prepare` hook to `app`: build it before the app starts."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._draining = False
        app.on_response_prepare.append(self._close_while_draining)

    async def _close_while_draining(
        self, request: web.Request, response: web.StreamResponse
    ) -> None:
        if self._draining:
            response.force_close()
            # The header is computed before this hook runs; force_close alone would not show.
            response.headers["Connection"] = "close"

    async def shutdown(self) -> None:
        # Called by cleanup after the sites stopped and before in-flight requests are awaited.
        self._draining = True
        await super().shutdown()

    async def _make_server(self) -> web.Server:
        # The extension point (abstract in BaseRunner). AppRunner's starts the app and builds a
        # plain Server; it is built again with the same arguments (private: `_kwargs`) and ours.
        plain = await super()._make_server()
        return _OpenSearchErrorServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **plain._kwargs,
        )


def serve(app: web.Application, settings: Settings) -> None:
    """Serve `app` on SIDECAR_LISTEN_HOST:PORT (HTTPS when the listener has a certificate) until
    SIGTERM or SIGINT, then shut down as aiohttp's run_app does: the listener closes, idle
    connections are closed, requests in flight get SIDECAR_SHUTDOWN_GRACE_S to finish, and the
    app's cleanup runs. A second signal, and one before the listener is up (nothing to
    drain yet), has its default effect: SIGTERM ends the process, SIGINT raises KeyboardInterrupt.

    Raises SettingsError for unusable listener TLS files, before any model is loaded."""
    tls = listener_tls(settings)
    _run(_serve_until_signal(app, settings, tls))


def _run(main: Coroutine[Any, Any, None]) -> None:
    """On uvloop where it is installed (not on Windows): the same asyncio API on libuv, about a
    tenth less CPU per proxied request than the standard loop (measured, `GET /` through a bare
    aiohttp proxy: 106 vs 116 us)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


async def _serve_until_signal(
    app: web.Application, settings: Settings, tls: ssl.SSLContext | None
) -> None:
    loop = asyncio.get_running_loop()
    signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
    runner = ListenerRunner(
        app,
        access_log=None,
        shutdown_timeout=settings.shutdown_grace_s,
        **listener_options(settings),
    )
    await runner.setup()
    metrics_runner = None
    try:
        site = web.TCPSite(runner, settings.listen_host, settings.listen_port, ssl_context=tls)
        await site.start()
        if (metrics_app := app.get(METRICS_APP)) is not None:
            metrics_runner = web.AppRunner(metrics_app, access_log=None)
            await metrics_runner.setup()
            metrics_site = web.TCPSite(metrics_runner, settings.listen_host, settings.metrics_port)
            await metrics_site.start()
            log.info("metrics on %s", metrics_site.name, extra={"url": metrics_site.name})
        for signum in _SHUTDOWN_SIGNALS:
            loop.add_signal_handler(signum, signals.put_nowait, signum)
        log.info("serving on %s", site.name, extra={"url": site.name})
        received = await signals.get()
        # Back to their default effect: a second signal is not ignored while draining.
        for signum in _SHUTDOWN_SIGNALS:
            loop.remove_signal_handler(signum)
        log.info(
            "shutting down on %s: the listener closes, requests in flight finish first",
            received.name,
            extra={"signal": received.name},
        )
    finally:
        await runner.cleanup()
        # Last: the drain itself is still scraped.
        if metrics_runner is not None:
            await metrics_runner.cleanup()
    log.info("stopped: requests drained, services closed")
