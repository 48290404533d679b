"""The JSON log lines: written by the listener thread, never the logging one; each with the request
id of the context it was logged in; every line queued is written once the listener stops."""

from __future__ import annotations

import atexit
import io
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from logging.handlers import QueueListener
from typing import Any

import pytest

from sidecar.logging import configure_json_logging, log_stage, request_id_var

log = logging.getLogger("sidecar.test")


class RecordingStream(io.StringIO):
    """A stream that notes which threads wrote to it."""

    def __init__(self) -> None:
        super().__init__()
        self.writers: set[str] = set()

    def write(self, text: str) -> int:
        self.writers.add(threading.current_thread().name)
        return super().write(text)


@dataclass
class Configured:
    stream: RecordingStream
    listener: QueueListener

    def stop_and_read(self) -> list[dict[str, Any]]:
        self.listener.stop()
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]


@pytest.fixture
def configured() -> Iterator[Configured]:
    """Root configured for JSON lines on a recording stream; each test stops the listener."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = RecordingStream()
    listener = configure_json_logging(stream=stream)
    yield Configured(stream, listener)
    atexit.unregister(listener.stop)
    root.handlers[:] = handlers
    root.setLevel(level)


def test_lines_are_written_by_the_listener_thread(configured: Configured) -> None:
    log.info("one line")
    lines = configured.stop_and_read()
    assert [line["msg"] for line in lines] == ["one line"]
    assert threading.current_thread().name not in configured.stream.writers


def test_the_request_id_is_the_one_of_the_logging_context(configured: Configured) -> None:
    token = request_id_var.set("req-1")
    try:
        log_stage("retrieve", 0.0123, candidates=3)
    finally:
        request_id_var.reset(token)
    log.info("outside any request")
    first, second = configured.stop_and_read()
    assert first["request_id"] == "req-1"
    assert (first["stage"], first["duration_ms"], first["candidates"]) == ("retrieve", 12.3, 3)
    assert "request_id" not in second


def test_arguments_are_merged_when_logged_and_tracebacks_kept(configured: Configured) -> None:
    changing = ["before"]
    log.info("saw %s", changing)
    changing[0] = "after"
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    seen, failed = configured.stop_and_read()
    assert seen["msg"] == "saw ['before']"
    assert failed["msg"] == "failed"
    assert "ValueError: boom" in failed["exception"]


def test_every_queued_line_is_written_once_the_listener_stops(configured: Configured) -> None:
    for number in range(2000):
        log.info("line %d", number)
    lines = configured.stop_and_read()
    assert [line["msg"] for line in lines] == [f"line {number}" for number in range(2000)]
