"""Stage 2 on a remote rerank server: the same `submit` the in-process micro-batcher offers, over
HTTP. A request's pairs are split to the server's batch limit and the parts sent concurrently,
within a per-backend bound on calls in flight; the server batches across callers itself.

Failures are the tier's, never the caller's: whatever goes wrong raises TierUnavailable with the
fail-open reason the pipeline reports (`backend_overloaded`: a 429 or 503 the sidecar could not
wait out; `backend_error`: anything else, the breaker open included). A 429/503 whose
Retry-After is within `max_retry_wait_s` is waited out once per part. The caller's deadline
bounds everything: cancelling `submit` cancels every call in flight.

The circuit breaker opens after `failure_threshold` consecutive failed calls: while open, submit
fails at once (a dead tier costs no waiting); after `open_s` one call goes through (half-open),
and its outcome closes or reopens the breaker. Hand-written: the Python breaker libraries are
synchronous (pybreaker) or unmaintained (aiobreaker), and this is a small state machine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sidecar.metrics import Metrics
from sidecar.rerank.backend import ScoringPair
from sidecar.rerank.remote.apis import AnswerError, Call, RerankApi

log = logging.getLogger(__name__)

BreakerState = Literal["closed", "half_open", "open"]
_BREAKER_GAUGE = {"closed": 0, "half_open": 1, "open": 2}


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: Any  # decoded JSON, None when the body was not JSON


# Sends one call to the tier and returns its answer; raises OSError/TimeoutError (or aiohttp's
# errors, which are OSErrors) when no answer came.
Send = Callable[[Call], Awaitable[Answer]]


class TierUnavailable(Exception):
    """The remote tier did not score; `reason` is the fail-open reason the caller reports."""

    def __init__(self, reason: Literal["backend_overloaded", "backend_error"], detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class TierLimits:
    # Calls to the tier in flight at once, over all requests.
    concurrency: int = 16
    # Longest Retry-After honoured (once per part); beyond it the part fails as overloaded.
    max_retry_wait_s: float = 1.0
    failure_threshold: int = 5
    open_s: float = 10.0


class Breaker:
    """Consecutive failures open it; after `open_s` one trial call decides."""

    def __init__(self, threshold: int, open_s: float, on_change: Callable[[BreakerState], None]):
        self._threshold = threshold
        self._open_s = open_s
        self._on_change = on_change
        self._failures = 0
        self._opened_at = 0.0
        self._trial_running = False
        self.state: BreakerState = "closed"

    def allow(self) -> bool:
        if self.state == "closed":
            return True
        if self.state == "open" and time.monotonic() - self._opened_at >= self._open_s:
            self._set("half_open")
        if self.state == "half_open" and not self._trial_running:
            self._trial_running = True
            return True
        return False

    def succeeded(self) -> None:
        self._failures = 0
        self._trial_running = False
        if self.state != "closed":
            self._set("closed")

    def failed(self) -> None:
        self._failures += 1
        self._trial_running = False
        if self.state == "half_open" or self._failures >= self._threshold:
            self._opened_at = time.monotonic()
            self._set("open")

    def _set(self, state: BreakerState) -> None:
        if state != self.state:
            log.warning("rerank tier breaker %s", state, extra={"breaker": state})
        self.state = state
        self._on_change(state)


class RemoteScorer:
    """`submit` and `check_admission` as MicroBatcher has them, for a remote tier."""

    def __init__(self, api: RerankApi, send: Send, limits: TierLimits, metrics: Metrics) -> None:
        self._api = api
        self._send = send
        self._limits = limits
        self._metrics = metrics
        self._slots = asyncio.Semaphore(limits.concurrency)
        self._pending = 0
        gauge = metrics.remote_breaker.labels(api.kind)
        self.breaker = Breaker(
            limits.failure_threshold,
            limits.open_s,
            lambda state: gauge.set(_BREAKER_GAUGE[state]),
        )
        gauge.set(0)

    @property
    def running(self) -> bool:
        """Always: readiness does not depend on the tier (searches answer unreranked, flagged)."""
        return True

    @property
    def pending_pairs(self) -> int:
        """Pairs sent and not yet answered."""
        return self._pending

    def check_admission(self, pairs: int) -> None:
        """The tier queues and sheds load itself (429): nothing to refuse here."""

    async def submit(self, items: Sequence[tuple[ScoringPair, int]]) -> list[float]:
        """One logit per (pair, token length) item, in order. Raises TierUnavailable."""
        self._pending += len(items)
        try:
            return await self._submit(items)
        finally:
            self._pending -= len(items)

    async def _submit(self, items: Sequence[tuple[ScoringPair, int]]) -> list[float]:
        if not self.breaker.allow():
            self._metrics.remote_requests.labels(self._api.kind, "breaker_open").inc()
            raise TierUnavailable("backend_error", "the rerank tier's circuit breaker is open")
        # The breaker was asked once for the whole request; the parts go as one decision.
        parts = _parts([pair for pair, _ in items], self._api.max_batch)
        try:
            # A failed part cancels the others: no call outlives the request's answer.
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._scored(query, texts)) for query, texts in parts]
        except* TierUnavailable as failed:
            self.breaker.failed()
            raise failed.exceptions[0] from None
        self.breaker.succeeded()
        return list(itertools.chain.from_iterable(task.result() for task in tasks))

    async def _scored(self, query: str, texts: Sequence[str]) -> list[float]:
        call = self._api.call(query, texts)
        for attempt in (1, 2):
            async with self._slots:
                answer = await self._answer(call, len(texts))
            wait_s = _retry_after_s(answer) if answer.status in (429, 503) else None
            if answer.status in (429, 503):
                outcome = "overloaded"
                self._metrics.remote_requests.labels(self._api.kind, outcome).inc()
                if attempt == 1 and wait_s is not None and wait_s <= self._limits.max_retry_wait_s:
                    await asyncio.sleep(wait_s)
                    continue
                raise TierUnavailable(
                    "backend_overloaded", f"the rerank tier answered {answer.status}"
                )
            if answer.status >= 400:
                self._metrics.remote_requests.labels(self._api.kind, "error").inc()
                raise TierUnavailable("backend_error", f"the rerank tier answered {answer.status}")
            try:
                logits = self._api.logits(answer.body, len(texts))
            except AnswerError as error:
                self._metrics.remote_requests.labels(self._api.kind, "error").inc()
                raise TierUnavailable("backend_error", str(error)) from None
            self._metrics.remote_requests.labels(self._api.kind, "ok").inc()
            return logits
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _answer(self, call: Call, pairs: int) -> Answer:
        started = time.perf_counter()
        try:
            return await self._send(call)
        except (OSError, TimeoutError) as error:
            self._metrics.remote_requests.labels(self._api.kind, "unreachable").inc()
            raise TierUnavailable(
                "backend_error", f"the rerank tier did not answer: {type(error).__name__}"
            ) from None
        finally:
            self._metrics.remote_duration.labels(self._api.kind).observe(
                time.perf_counter() - started
            )
            self._metrics.remote_batch_pairs.labels(self._api.kind).observe(pairs)


def _parts(pairs: Sequence[ScoringPair], max_batch: int) -> list[tuple[str, list[str]]]:
    """(query, texts) calls in the order of `pairs`: a new call where the query changes or the
    batch limit is reached, so the concatenated answers line up with `pairs`."""
    parts: list[tuple[str, list[str]]] = []
    for pair in pairs:
        if parts and parts[-1][0] == pair.query and len(parts[-1][1]) < max_batch:
            parts[-1][1].append(pair.text)
        else:
            parts.append((pair.query, [pair.text]))
    return parts


def _retry_after_s(answer: Answer) -> float | None:
    """Retry-After in seconds (the delay form; an HTTP date is not waited for)."""
    value = answer.headers.get("Retry-After", "").strip()
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
