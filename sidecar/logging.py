"""Structured logs: one JSON object per line, carrying the request id of the request being served.
Lines are formatted and written on a listener thread, so a slow stderr never stalls the event loop."""

from __future__ import annotations

import atexit
import contextvars
import copy
import json
import logging
import queue
import time
from logging.handlers import QueueHandler, QueueListener
from typing import Any, TextIO

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)

_STAGE_LOGGER = logging.getLogger("sidecar.stage")
# LogRecord attributes that are not user fields.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """A record's fields as one JSON object; the request id is the one bound to the record when
    it was logged (`request_id`, by _ContextQueueHandler)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _RESERVED})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _ContextQueueHandler(QueueHandler):
    """Enqueues a copy of each record (other handlers keep the original) with what the listener
    thread cannot know or might see changed: the request id of the context that logged it, and
    the message merged with its arguments. Formatting, tracebacks included, is left to the listener."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        prepared = copy.copy(record)
        prepared.msg, prepared.args = record.getMessage(), None
        if (request_id := request_id_var.get()) is not None:
            prepared.request_id = request_id
        return prepared


def configure_json_logging(
    level: int = logging.INFO, stream: TextIO | None = None
) -> QueueListener:
    """Root logs as JSON lines on `stream` (stderr), through the standard library's QueueHandler
    and QueueListener: a logging call only puts a copy of its record on a queue. The listener is
    stopped at exit, which writes the lines still queued; it is returned to be stopped earlier."""
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    output = logging.StreamHandler(stream)
    output.setFormatter(JsonFormatter())
    listener = QueueListener(records, output)
    listener.start()
    atexit.register(listener.stop)
    root = logging.getLogger()
    root.handlers[:] = [_ContextQueueHandler(records)]
    root.setLevel(level)
    logging.getLogger("opensearch").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return listener


def log_stage(stage: str, duration_s: float, **fields: Any) -> None:
    """The one line each stage writes per request: its name, duration and counts."""
    _STAGE_LOGGER.info(
        stage, extra={"stage": stage, "duration_ms": round(duration_s * 1000, 3), **fields}
    )
