"""Merges concurrent requests' cross-encoder pairs into shared batches, between the reranker and the
model backend. One loop task owns the queue; the model runs on one executor thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class BatchLimits:
    """How batches are cut and how much work is admitted."""

    max_batch_pairs: int = 64
    # Padded tokens per model call: the longest pair's tokens x pairs in the batch.
    max_batch_tokens: int = 16384
    # How long a queued pair may wait for company before its batch is cut.
    max_wait_s: float = 0.002
    # Admission bound on pairs queued or running; beyond it submit raises Overloaded (a request
    # larger than the bound is admitted only when nothing else is pending).
    max_pending_pairs: int = 4096
    # False: a batch only ever holds pairs of one request and never waits for company (the
    # per-request baseline that benchmarks compare cross-request batching against).
    merge_requests: bool = True

    def __post_init__(self) -> None:
        for name in ("max_batch_pairs", "max_batch_tokens", "max_pending_pairs"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not self.max_wait_s >= 0:  # also rejects NaN
            raise ValueError(f"max_wait_s must be >= 0, got {self.max_wait_s}")


@dataclass(frozen=True)
class BatchStats:
    """One model call, reported through on_batch; exporting it is the metrics module's job."""

    pairs: int
    padded_tokens: int
    queue_wait_s: float  # longest wait of any pair in the batch before the call started
    inference_s: float
    failed: bool


class Overloaded(Exception):
    """Admission refused: too many pairs pending. `retry_after_s` estimates when room frees up."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"reranker queue is full; retry after {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


class BatcherClosed(Exception):
    """The batcher is not running: not started, stopped, or its loop died."""


class BatchTooLarge(Exception):
    """Raised by run_batch (e.g. on CUDA out-of-memory) to have the batch split and retried."""


@dataclass(eq=False)
class _Request:
    future: asyncio.Future[list[float]]
    scores: list[float]
    admitted_s: float
    queued_pairs: int  # admitted, not yet taken into a batch
    unscored_pairs: int


@dataclass(eq=False)
class _Pair(Generic[T]):
    request: _Request
    index: int
    payload: T
    tokens: int


class MicroBatcher(Generic[T]):
    """Scores pairs from many requests in shared, length-sorted batches, one model call at a time.

    Every submit ends with its scores or an exception: a batch failure reaches every request in
    that batch, and stopping or a dead loop fails whatever is still pending with BatcherClosed.
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], list[float]],
        limits: BatchLimits,
        executor: concurrent.futures.Executor,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._limits = limits
        self._executor = executor
        self._on_batch = on_batch
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # submit appends to the inbox; only the loop moves pairs on into the queue.
        self._inbox: list[_Pair[T]] = []
        self._arrival = asyncio.Event()
        self._queue: list[_Pair[T]] = []  # arrival order
        self._unresolved: set[_Request] = set()
        self._pending_pairs = 0
        self._last_s_per_pair = 0.0

    async def start(self) -> None:
        """Start the loop task. Raises RuntimeError when called twice or after stop()."""
        if self._task is not None or self._closed:
            raise RuntimeError("a MicroBatcher can be started once")
        self._task = asyncio.get_running_loop().create_task(self._serve(), name="micro-batcher")
        self._task.add_done_callback(_log_loop_end)

    async def stop(self) -> None:
        """Let a running batch finish, then fail every pending request with BatcherClosed."""
        self._closed = True
        if self._task is None:
            return
        self._arrival.set()
        await asyncio.wait([self._task])

    @property
    def running(self) -> bool:
        """False before start, after stop, and once the loop has died (readiness turns false)."""
        return self._task is not None and not self._task.done() and not self._closed

    @property
    def pending_pairs(self) -> int:
        """Pairs admitted and not yet finished (queued or running)."""
        return self._pending_pairs

    def check_admission(self, pairs: int) -> None:
        """Raises Overloaded if `pairs` more would not be admitted now: callers ask before doing
        the work that would produce them (embedding, the first stage)."""
        pending = self._pending_pairs
        if pending > 0 and pending + pairs > self._limits.max_pending_pairs:
            # Time to drain the backlog at the last batch's pace; Retry-After has whole seconds.
            raise Overloaded(max(1.0, pending * self._last_s_per_pair))

    async def submit(self, items: Sequence[tuple[T, int]]) -> list[float]:
        """Score one request's (payload, token_length) items; one score per item, in order.

        Raises Overloaded at once, queuing nothing, when the items would take pending_pairs past
        max_pending_pairs while other pairs are pending (alone, any request is admitted: it is
        never starved); BatcherClosed when the
        batcher is not running or stops first; otherwise whatever run_batch raised for a batch
        holding one of the items. Cancelling the caller drops its items not yet run.
        """
        if not items:
            return []
        if self._task is None or self._closed:
            raise BatcherClosed("the micro-batcher is not running")
        self.check_admission(len(items))
        request = _Request(
            future=asyncio.get_running_loop().create_future(),
            scores=[0.0] * len(items),
            admitted_s=time.monotonic(),
            queued_pairs=len(items),
            unscored_pairs=len(items),
        )
        self._inbox.extend(
            _Pair(request, index, payload, tokens) for index, (payload, tokens) in enumerate(items)
        )
        self._pending_pairs += len(items)
        self._unresolved.add(request)
        self._arrival.set()
        try:
            return await request.future
        finally:
            self._forget(request)

    async def _serve(self) -> None:
        try:
            while True:
                await self._wait_for_batch()
                if self._closed:
                    return
                await self._execute(self._cut_batch())
        finally:
            self._close()

    async def _wait_for_batch(self) -> None:
        """Return once a batch is due: max_batch_pairs are queued, or max_wait_s has passed since
        the oldest queued pair was admitted (so no extra wait when it queued behind a batch)."""
        self._collect()
        while not self._queue:
            if self._closed:
                return
            await self._arrival.wait()
            self._collect()
        if not self._limits.merge_requests:
            return
        due_s = self._queue[0].request.admitted_s + self._limits.max_wait_s
        while len(self._queue) < self._limits.max_batch_pairs and not self._closed:
            remaining_s = due_s - time.monotonic()
            if remaining_s <= 0:
                return
            try:
                async with asyncio.timeout(remaining_s):
                    await self._arrival.wait()
            except TimeoutError:
                return
            self._collect()

    def _collect(self) -> None:
        """Move new arrivals into the queue and drop pairs whose request has ended (a cancelled
        submit's own clean-up may not have run yet)."""
        self._queue.extend(self._inbox)
        self._inbox.clear()
        self._arrival.clear()
        live = []
        for pair in self._queue:
            if pair.request.future.done():
                self._forget(pair.request)
            else:
                live.append(pair)
        self._queue = live

    def _cut_batch(self) -> list[_Pair[T]]:
        """Take the next batch off the queue.

        Fairness: every batch holds the oldest queued pair, so a pair runs within k + 1 batches of
        its arrival when k pairs are older; a long pair is never starved by a stream of short ones.
        Around it the batch grows over its neighbours in token-length order, each step taking the
        neighbour that adds less padding, while the pair count stays within max_batch_pairs and
        longest x count within max_batch_tokens. The oldest pair alone always fits.
        """
        self._collect()
        if not self._queue:
            return []
        oldest = self._queue[0]
        pool = (
            self._queue
            if self._limits.merge_requests
            else [pair for pair in self._queue if pair.request is oldest.request]
        )
        by_length = sorted(pool, key=lambda pair: pair.tokens)
        low = high = by_length.index(oldest)
        longest = by_length[low].tokens
        while high - low + 1 < self._limits.max_batch_pairs:
            count = high - low + 2  # pairs after taking one more
            fits_shorter = low > 0 and longest * count <= self._limits.max_batch_tokens
            fits_longer = (
                high + 1 < len(by_length)
                and by_length[high + 1].tokens * count <= self._limits.max_batch_tokens
            )
            if not (fits_shorter or fits_longer):
                break
            # A shorter pair pads only itself up to `longest`; a longer one pads every pair taken.
            shorter_padding = longest - by_length[low - 1].tokens if fits_shorter else None
            longer_padding = (
                (by_length[high + 1].tokens - longest) * (count - 1) if fits_longer else None
            )
            if longer_padding is None or (
                shorter_padding is not None and shorter_padding <= longer_padding
            ):
                low -= 1
            else:
                high += 1
                longest = by_length[high].tokens
        batch = by_length[low : high + 1]
        taken = set(batch)
        self._queue = [pair for pair in self._queue if pair not in taken]
        for pair in batch:
            pair.request.queued_pairs -= 1
        return batch

    async def _execute(self, batch: list[_Pair[T]]) -> None:
        """Run one batch and settle its pairs; on BatchTooLarge run each half in turn instead."""
        live = [pair for pair in batch if not pair.request.future.done()]
        self._pending_pairs -= len(batch) - len(live)
        if not live:
            return
        outcome = await self._call_model(live)
        if isinstance(outcome, BatchTooLarge) and len(live) > 1:
            half = len(live) // 2
            await self._execute(live[:half])
            await self._execute(live[half:])
            return
        self._pending_pairs -= len(live)
        if isinstance(outcome, Exception):
            for request in dict.fromkeys(pair.request for pair in live):
                self._fail(request, outcome)
            return
        for pair, score in zip(live, outcome, strict=True):
            request = pair.request
            if request.future.done():  # cancelled or failed while its batch ran
                continue
            request.scores[pair.index] = score
            request.unscored_pairs -= 1
            if request.unscored_pairs == 0:
                request.future.set_result(request.scores)
                self._forget(request)

    async def _call_model(self, pairs: list[_Pair[T]]) -> list[float] | Exception:
        """One run_batch call on the executor; its failure is returned, not raised."""
        started_s = time.monotonic()
        outcome: list[float] | Exception
        try:
            scores = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._run_batch, [pair.payload for pair in pairs]
            )
        except Exception as error:
            outcome = error
        else:
            outcome = (
                scores
                if len(scores) == len(pairs)
                else RuntimeError(f"run_batch returned {len(scores)} scores for {len(pairs)} pairs")
            )
        inference_s = time.monotonic() - started_s
        failed = isinstance(outcome, Exception)
        if not failed:
            self._last_s_per_pair = inference_s / len(pairs)
        self._report(
            BatchStats(
                pairs=len(pairs),
                padded_tokens=max(pair.tokens for pair in pairs) * len(pairs),
                queue_wait_s=started_s - min(pair.request.admitted_s for pair in pairs),
                inference_s=inference_s,
                failed=failed,
            )
        )
        return outcome

    def _report(self, stats: BatchStats) -> None:
        if self._on_batch is None:
            return
        try:
            self._on_batch(stats)
        except Exception:
            logger.exception("on_batch callback failed; batching goes on")

    def _fail(self, request: _Request, error: BaseException) -> None:
        if not request.future.done():
            request.future.set_exception(error)
        self._forget(request)

    def _forget(self, request: _Request) -> None:
        """Release a finished request's queued pairs from the admission count; idempotent."""
        self._pending_pairs -= request.queued_pairs
        request.queued_pairs = 0
        self._unresolved.discard(request)

    def _close(self) -> None:
        self._closed = True
        for request in list(self._unresolved):
            self._fail(request, BatcherClosed("the micro-batcher stopped before this request ran"))
        self._inbox.clear()
        self._queue.clear()
        # Nothing is pending once closed; a batch cut off mid-call (loop cancelled) is abandoned.
        self._pending_pairs = 0


def _log_loop_end(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        logger.warning("micro-batcher loop was cancelled; pending requests failed")
    elif (error := task.exception()) is not None:
        logger.error("micro-batcher loop died; pending requests failed", exc_info=error)
