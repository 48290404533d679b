import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import pytest

from sidecar.rerank.batcher import (
    BatcherClosed,
    BatchLimits,
    BatchStats,
    BatchTooLarge,
    MicroBatcher,
    Overloaded,
)

# Only a guard against hangs; nothing here waits that long when the batcher behaves.
HANG_GUARD_S = 5.0
HELD = 0  # payload of the request that FakeModel holds on the model thread until released


class FakeModel:
    """Scores payload p as float(p) and records every batch. A batch holding HELD blocks until
    `release` is set, so tests can queue work behind a running batch; `fail` decides failures."""

    def __init__(self, fail: Callable[[list[int]], BaseException | None] = lambda _: None) -> None:
        self.batches: list[list[int]] = []
        self.holding = threading.Event()
        self.release = threading.Event()
        self._fail = fail

    def __call__(self, payloads: list[int]) -> list[float]:
        self.batches.append(list(payloads))
        if HELD in payloads:
            self.holding.set()
            self.release.wait(HANG_GUARD_S)
        error = self._fail(payloads)
        if error is not None:
            raise error
        return [float(payload) for payload in payloads]

    def ran(self) -> set[int]:
        return {payload for batch in self.batches for payload in batch}


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def guarded() -> None:
        await asyncio.wait_for(test(), HANG_GUARD_S)

    asyncio.run(guarded())


@asynccontextmanager
async def running_batcher(
    model: FakeModel, limits: BatchLimits, on_batch: Callable[[BatchStats], None] | None = None
) -> AsyncIterator[MicroBatcher[int]]:
    with ThreadPoolExecutor(max_workers=1) as executor:
        batcher = MicroBatcher(model, limits, executor, on_batch)
        await batcher.start()
        try:
            yield batcher
        finally:
            model.release.set()
            await batcher.stop()


async def hold_model(batcher: MicroBatcher[int], model: FakeModel) -> asyncio.Task[list[float]]:
    """Occupy the model thread with the HELD payload; returns its pending submit."""
    held = asyncio.create_task(batcher.submit([(HELD, 1)]))
    await asyncio.to_thread(model.holding.wait, HANG_GUARD_S)
    return held


def submit_all(
    batcher: MicroBatcher[int], requests: Sequence[Sequence[tuple[int, int]]]
) -> list[asyncio.Task[list[float]]]:
    return [asyncio.create_task(batcher.submit(items)) for items in requests]


async def let_submits_queue() -> None:
    """Let freshly created submit tasks run up to their wait for a result."""
    await asyncio.sleep(0)


def test_concurrent_requests_share_a_batch() -> None:
    model = FakeModel()

    async def scenario() -> None:
        async with running_batcher(model, BatchLimits(max_wait_s=0)) as batcher:
            held = await hold_model(batcher, model)
            tasks = submit_all(batcher, [[(1, 5), (2, 5)], [(3, 5)], [(4, 5), (5, 5)]])
            await let_submits_queue()
            model.release.set()
            assert await asyncio.gather(held, *tasks) == [[0.0], [1.0, 2.0], [3.0], [4.0, 5.0]]
        assert model.batches == [[HELD], [1, 2, 3, 4, 5]]

    run(scenario)


def test_first_pair_waits_for_company_until_a_batch_is_full() -> None:
    model = FakeModel()

    async def scenario() -> None:
        # A wait far beyond the hang guard: only a full batch can end it.
        limits = BatchLimits(max_batch_pairs=2, max_wait_s=60)
        async with running_batcher(model, limits) as batcher:
            (early,) = submit_all(batcher, [[(1, 3)]])
            for _ in range(3):
                await let_submits_queue()
            assert await batcher.submit([(2, 3)]) == [2.0]
            assert await early == [1.0]
        assert model.batches == [[1, 2]]

    run(scenario)


def test_scores_map_back_to_each_request_and_item_across_length_sorted_batches() -> None:
    model = FakeModel()
    tokens = {10: 5, 11: 100, 12: 6, 20: 101, 21: 7, 22: 99}

    async def scenario() -> None:
        limits = BatchLimits(max_batch_pairs=3, max_wait_s=0)
        async with running_batcher(model, limits) as batcher:
            held = await hold_model(batcher, model)
            first, second = submit_all(
                batcher,
                [[(p, tokens[p]) for p in (10, 11, 12)], [(p, tokens[p]) for p in (20, 21, 22)]],
            )
            await let_submits_queue()
            model.release.set()
            await held
            assert await first == [10.0, 11.0, 12.0]
            assert await second == [20.0, 21.0, 22.0]
        # Similar lengths share a batch, whichever request they came from.
        assert model.batches[1:] == [[10, 12, 21], [22, 11, 20]]

    run(scenario)


def test_batches_respect_pair_and_padded_token_limits() -> None:
    model = FakeModel()
    lengths = [10, 60, 20, 30, 150, 10, 20, 60, 30, 10, 20]
    items = [(payload, length) for payload, length in enumerate(lengths, start=1)]
    tokens = dict(items)

    async def scenario() -> None:
        limits = BatchLimits(max_batch_pairs=4, max_batch_tokens=100, max_wait_s=0)
        async with running_batcher(model, limits) as batcher:
            held = await hold_model(batcher, model)
            (task,) = submit_all(batcher, [items])
            await let_submits_queue()
            model.release.set()
            await held
            assert await task == [float(payload) for payload, _ in items]
        batches = model.batches[1:]
        assert sorted(p for batch in batches for p in batch) == [p for p, _ in items]
        for batch in batches:
            assert len(batch) <= 4
            assert len(batch) == 1 or max(tokens[p] for p in batch) * len(batch) <= 100
        assert [5] in batches  # the 150-token pair exceeds the budget alone and runs alone

    run(scenario)


def test_batch_failure_reaches_every_request_in_it_and_drops_their_other_pairs() -> None:
    boom = RuntimeError("model exploded")
    model = FakeModel(fail=lambda payloads: boom if 1 in payloads else None)

    async def scenario() -> None:
        limits = BatchLimits(max_batch_pairs=3, max_wait_s=0)
        async with running_batcher(model, limits) as batcher:
            held = await hold_model(batcher, model)
            tasks = submit_all(batcher, [[(1, 10), (2, 500)], [(3, 11)], [(4, 12)], [(5, 600)]])
            await let_submits_queue()
            model.release.set()
            await held
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert results[:3] == [boom, boom, boom]
            assert results[3] == [5.0]
            assert batcher.pending_pairs == 0
        assert 2 not in model.ran()

    run(scenario)


def test_wrong_number_of_scores_fails_the_batch() -> None:
    class ShortModel(FakeModel):
        def __call__(self, payloads: list[int]) -> list[float]:
            return super().__call__(payloads)[:1]

    async def scenario() -> None:
        async with running_batcher(ShortModel(), BatchLimits(max_wait_s=0)) as batcher:
            with pytest.raises(RuntimeError, match="returned 1 scores for 2 pairs"):
                await batcher.submit([(1, 3), (2, 3)])
            assert await batcher.submit([(3, 3)]) == [3.0]

    run(scenario)


def test_batch_too_large_is_split_in_halves_and_retried() -> None:
    model = FakeModel(fail=lambda payloads: BatchTooLarge() if len(payloads) > 2 else None)
    stats: list[BatchStats] = []

    async def scenario() -> None:
        async with running_batcher(model, BatchLimits(max_wait_s=0), stats.append) as batcher:
            assert await batcher.submit([(p, 4) for p in (1, 2, 3, 4, 5)]) == [
                1.0,
                2.0,
                3.0,
                4.0,
                5.0,
            ]
        assert model.batches == [[1, 2, 3, 4, 5], [1, 2], [3, 4, 5], [3], [4, 5]]
        assert [s.failed for s in stats] == [True, False, True, False, False]

    run(scenario)


def test_requests_failed_in_one_half_are_not_run_in_the_other() -> None:
    def fail(payloads: list[int]) -> BaseException | None:
        if len(payloads) > 2:
            return BatchTooLarge()
        return RuntimeError("bad pair") if 1 in payloads else None

    model = FakeModel(fail=fail)

    async def scenario() -> None:
        async with running_batcher(model, BatchLimits(max_wait_s=0)) as batcher:
            held = await hold_model(batcher, model)
            tasks = submit_all(batcher, [[(1, 1), (3, 3)], [(2, 2), (4, 4)]])
            await let_submits_queue()
            model.release.set()
            await held
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert [type(result) for result in results] == [RuntimeError, RuntimeError]
            assert batcher.pending_pairs == 0
        assert model.batches[1:] == [[1, 2, 3, 4], [1, 2]]

    run(scenario)


def test_batch_too_large_on_a_single_pair_fails_only_its_request() -> None:
    model = FakeModel(fail=lambda payloads: BatchTooLarge() if 7 in payloads else None)

    async def scenario() -> None:
        async with running_batcher(model, BatchLimits(max_wait_s=0)) as batcher:
            held = await hold_model(batcher, model)
            oversized, fine = submit_all(batcher, [[(1, 3), (7, 3)], [(2, 3), (3, 3)]])
            await let_submits_queue()
            model.release.set()
            await held
            with pytest.raises(BatchTooLarge):
                await oversized
            assert await fine == [2.0, 3.0]
        assert [7] in model.batches

    run(scenario)


def test_admission_is_refused_at_once_beyond_max_pending_pairs() -> None:
    model = FakeModel()

    async def scenario() -> None:
        limits = BatchLimits(max_pending_pairs=3, max_wait_s=0)
        async with running_batcher(model, limits) as batcher:
            held = await hold_model(batcher, model)
            (admitted,) = submit_all(batcher, [[(1, 2)]])
            await let_submits_queue()
            assert batcher.pending_pairs == 2
            with pytest.raises(Overloaded) as refused:
                await batcher.submit([(2, 2), (3, 2)])
            assert refused.value.retry_after_s > 0
            assert batcher.pending_pairs == 2
            model.release.set()
            assert [await held, await admitted] == [[0.0], [1.0]]
            assert batcher.pending_pairs == 0
            assert await batcher.submit([(2, 2), (3, 2), (4, 2)]) == [2.0, 3.0, 4.0]
        assert model.batches == [[HELD], [1], [2, 3, 4]]

    run(scenario)


def test_cancelled_submit_is_never_run_and_releases_its_pairs() -> None:
    model = FakeModel()

    async def scenario() -> None:
        async with running_batcher(model, BatchLimits(max_wait_s=0)) as batcher:
            held = await hold_model(batcher, model)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(batcher.submit([(1, 2), (2, 2)]), timeout=0.01)
            assert batcher.pending_pairs == 1
            (later,) = submit_all(batcher, [[(3, 2)]])
            await let_submits_queue()
            model.release.set()
            assert [await held, await later] == [[0.0], [3.0]]
            assert batcher.pending_pairs == 0
        assert model.ran() == {HELD, 3}

    run(scenario)


def test_stop_finishes_the_running_batch_and_fails_queued_requests() -> None:
    model = FakeModel()

    async def scenario() -> None:
        async with running_batcher(model, BatchLimits(max_wait_s=0)) as batcher:
            held = await hold_model(batcher, model)
            (waiting,) = submit_all(batcher, [[(1, 2)]])
            await let_submits_queue()
            stopping = asyncio.create_task(batcher.stop())
            await let_submits_queue()
            model.release.set()
            await stopping
            assert await held == [0.0]
            with pytest.raises(BatcherClosed):
                await waiting
            with pytest.raises(BatcherClosed):
                await batcher.submit([(2, 2)])
            assert batcher.pending_pairs == 0
        assert model.batches == [[HELD]]

    run(scenario)


def test_submit_before_start_is_refused_and_empty_requests_need_no_model() -> None:
    async def scenario() -> None:
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = MicroBatcher(FakeModel(), BatchLimits(), executor)
            with pytest.raises(BatcherClosed):
                await batcher.submit([(1, 2)])
            assert await batcher.submit([]) == []

    run(scenario)


def test_a_dead_model_thread_fails_every_waiter_and_closes_the_batcher() -> None:
    class ThreadDied(BaseException):
        """Escapes `except Exception`, as a crash of the model thread would."""

    model = FakeModel(fail=lambda payloads: ThreadDied() if HELD in payloads else None)

    async def scenario() -> None:
        async with running_batcher(model, BatchLimits(max_wait_s=0)) as batcher:
            held = await hold_model(batcher, model)
            (waiting,) = submit_all(batcher, [[(1, 2)]])
            await let_submits_queue()
            model.release.set()
            results = await asyncio.gather(held, waiting, return_exceptions=True)
            assert [type(result) for result in results] == [BatcherClosed, BatcherClosed]
            with pytest.raises(BatcherClosed):
                await batcher.submit([(2, 2)])

    run(scenario)


def test_on_batch_reports_each_model_call_and_cannot_break_the_loop() -> None:
    model = FakeModel(fail=lambda payloads: RuntimeError("no") if 9 in payloads else None)
    stats: list[BatchStats] = []

    def record_then_raise(batch: BatchStats) -> None:
        stats.append(batch)
        raise RuntimeError("metrics exporter broke")

    async def scenario() -> None:
        async with running_batcher(model, BatchLimits(max_wait_s=0), record_then_raise) as batcher:
            assert await batcher.submit([(1, 10), (2, 30)]) == [1.0, 2.0]
            with pytest.raises(RuntimeError, match="no"):
                await batcher.submit([(9, 7)])
            assert await batcher.submit([(3, 4)]) == [3.0]
        assert [(s.pairs, s.padded_tokens, s.failed) for s in stats] == [
            (2, 60, False),
            (1, 7, True),
            (1, 4, False),
        ]
        assert all(s.queue_wait_s >= 0 and s.inference_s >= 0 for s in stats)

    run(scenario)


def test_the_oldest_pair_is_in_the_next_batch_despite_shorter_arrivals() -> None:
    model = FakeModel()

    async def scenario() -> None:
        limits = BatchLimits(max_batch_pairs=2, max_wait_s=0)
        async with running_batcher(model, limits) as batcher:
            held = await hold_model(batcher, model)
            tasks = submit_all(batcher, [[(100, 500)], *([(p, 1)] for p in range(1, 7))])
            await let_submits_queue()
            model.release.set()
            await asyncio.gather(held, *tasks)
        # Sorting by length alone would leave the long pair for last.
        assert 100 in model.batches[1]

    run(scenario)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_pairs": 0},
        {"max_batch_tokens": -1},
        {"max_pending_pairs": 0},
        {"max_wait_s": -0.1},
        {"max_wait_s": float("nan")},
    ],
)
def test_limits_reject_non_positive_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        BatchLimits(**kwargs)


def test_without_request_merging_every_batch_holds_one_request() -> None:
    gate = threading.Event()
    batches: list[list[str]] = []

    def run_batch(payloads: list[str]) -> list[float]:
        gate.wait(timeout=10)
        batches.append(payloads)
        return [0.0] * len(payloads)

    async def scenario() -> None:
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher: MicroBatcher[str] = MicroBatcher(
                run_batch, BatchLimits(max_wait_s=1.0, merge_requests=False), executor
            )
            await batcher.start()
            requests = [
                asyncio.create_task(batcher.submit([(f"{name}{i}", 5) for i in range(3)]))
                for name in "abc"
            ]
            await asyncio.sleep(0)
            gate.set()
            await asyncio.wait_for(asyncio.gather(*requests), timeout=10)
            await batcher.stop()

    asyncio.run(scenario())
    assert sorted(batches) == [["a0", "a1", "a2"], ["b0", "b1", "b2"], ["c0", "c1", "c2"]]


def test_running_reflects_the_loop() -> None:
    async def scenario() -> tuple[bool, bool, bool]:
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher: MicroBatcher[str] = MicroBatcher(
                lambda p: [0.0] * len(p), BatchLimits(), executor
            )
            before = batcher.running
            await batcher.start()
            during = batcher.running
            await batcher.stop()
            return before, during, batcher.running

    assert asyncio.run(scenario()) == (False, True, False)


def test_a_request_larger_than_the_bound_is_admitted_alone_and_never_starved() -> None:
    model = FakeModel()

    async def scenario() -> None:
        limits = BatchLimits(max_pending_pairs=2, max_wait_s=0)
        async with running_batcher(model, limits) as batcher:
            assert await batcher.submit([(1, 2), (2, 2), (3, 2)]) == [1.0, 2.0, 3.0]
            held = await hold_model(batcher, model)
            with pytest.raises(Overloaded):
                batcher.check_admission(3)
            with pytest.raises(Overloaded):
                await batcher.submit([(4, 2), (5, 2), (6, 2)])
            batcher.check_admission(1)  # room for one more beside the held pair
            model.release.set()
            assert await held == [0.0]
            batcher.check_admission(3)
        assert model.ran() == {1, 2, 3, HELD}

    run(scenario)
