"""The per-model batcher, driven by a recording fake `run`: cross-request batching, limits, cancellation."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from sie_router.errors import SIEError
from sie_router.pool import batcher as batcher_module
from sie_router.pool.batcher import Batcher, BatchLimits
from sie_router.pool.pacing import BatchReport, BusyTimeFit, Pacer


class Recorder:
    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[str]] = []
        self.delay = delay

    async def __call__(self, key: object, items: list[str]) -> BatchReport:
        self.batches.append(list(items))
        await asyncio.sleep(self.delay)
        return BatchReport([f"out:{item}" for item in items], busy_s=self.delay)


class Gated(Recorder):
    """A worker whose batches finish only while the test holds its gate open; each reports `busy_s` as its time."""

    def __init__(self, busy_s: float = 0.0) -> None:
        super().__init__(busy_s)
        self.gate = asyncio.Event()

    async def __call__(self, key: object, items: list[str]) -> BatchReport:
        self.batches.append(list(items))
        await self.gate.wait()
        return BatchReport([f"out:{item}" for item in items], busy_s=self.delay)


async def until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


def make(recorder: Recorder, **limits: float) -> Batcher:
    batcher = Batcher("m", recorder, BatchLimits(**limits))  # type: ignore[arg-type]
    batcher.start()
    return batcher


async def test_concurrent_requests_share_a_batch_and_get_their_own_outputs() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_wait_ms=20)
    results = await asyncio.gather(*(batcher.submit("k", [f"t{i}"], [3]) for i in range(10)))
    assert results == [[f"out:t{i}"] for i in range(10)]
    assert len(recorder.batches) == 1 and sorted(recorder.batches[0]) == sorted(f"t{i}" for i in range(10))
    await batcher.close()


async def test_big_client_batches_are_split_and_reassembled_in_order() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_items=4, max_wait_ms=0)
    items = [f"x{i}" for i in range(10)]
    assert await batcher.submit("k", items, [1] * 10) == [f"out:{i}" for i in items]
    assert all(len(b) <= 4 for b in recorder.batches) and len(recorder.batches) == 3
    await batcher.close()


async def test_a_client_batch_stays_whole_up_to_the_request_cap_while_joined_requests_stop_at_the_item_cap() -> None:
    recorder = Gated()
    batcher = make(recorder, max_items=4, max_request_items=8, max_wait_ms=0, in_flight=1)
    big = asyncio.create_task(batcher.submit("k", [f"x{i}" for i in range(10)], [1] * 10))
    await until(lambda: len(recorder.batches) == 1)
    # Single-item requests queue behind it: joined (with the client batch's last 2 items), they stop at the item cap.
    small = [asyncio.create_task(batcher.submit("k", [f"s{i}"], [1])) for i in range(6)]
    await until(lambda: batcher.queued_items == 2 + 6)
    recorder.gate.set()
    assert await big == [f"out:x{i}" for i in range(10)]
    assert [await task for task in small] == [[f"out:s{i}"] for i in range(6)]
    assert recorder.batches[0] == [f"x{i}" for i in range(8)]  # one batch of 8, over the item cap of 4
    assert all(len(b) <= 4 for b in recorder.batches[1:]) and sum(map(len, recorder.batches[1:])) == 2 + 6
    await batcher.close()


async def test_a_client_batch_is_cut_at_the_token_budget_shortest_first() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_items=64, max_request_items=64, max_tokens=10, max_wait_ms=0, in_flight=1)
    costs = [4, 9, 3, 3, 12, 2]
    items = [f"t{cost}_{i}" for i, cost in enumerate(costs)]
    assert await batcher.submit("k", items, costs) == [f"out:{item}" for item in items]
    # Length order 2, 3, 3, 4 | 9 | 12: each entry within 10 tokens, an item over the budget alone.
    assert recorder.batches == [["t2_5", "t3_2", "t3_3"], ["t4_0"], ["t9_1"], ["t12_4"]]
    await batcher.close()


async def test_token_budget_and_keys_separate_batches() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_tokens=10, max_wait_ms=20)
    await asyncio.gather(batcher.submit("a", ["a1"], [6]), batcher.submit("a", ["a2"], [6]),
                         batcher.submit("b", ["b1"], [1]))
    assert sorted(map(sorted, recorder.batches)) == [["a1"], ["a2"], ["b1"]]
    await batcher.close()


async def test_similar_lengths_are_batched_together() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_items=2, max_wait_ms=30, in_flight=1)
    costs = {"short1": 2, "long1": 200, "short2": 3, "long2": 190}
    await asyncio.gather(*(batcher.submit("k", [name], [cost]) for name, cost in costs.items()))
    assert sorted(map(sorted, recorder.batches)) == [["long1", "long2"], ["short1", "short2"]]
    await batcher.close()


async def test_full_queue_is_retryable_and_oversized_request_is_invalid() -> None:
    batcher = make(Recorder(delay=0.2), max_queue_items=4, max_wait_ms=0, in_flight=1, max_items=2)
    first = asyncio.create_task(batcher.submit("k", ["a", "b", "c", "d"], [1] * 4))
    await asyncio.sleep(0)
    with pytest.raises(SIEError) as full:
        await batcher.submit("k", ["e"], [1])
    assert full.value.code == "QUEUE_FULL"
    with pytest.raises(SIEError) as huge:
        await batcher.submit("k", list("abcde"), [1] * 5)
    assert huge.value.code == "INVALID_INPUT"
    assert len(await first) == 4
    await batcher.close()


async def test_cancelled_requests_are_never_sent() -> None:
    recorder = Gated()
    batcher = make(recorder, max_items=1, max_wait_ms=0, in_flight=1)
    keep = asyncio.create_task(batcher.submit("k", ["first"], [1]))
    await until(lambda: recorder.batches == [["first"]])  # at the worker, which holds it
    gone = asyncio.create_task(batcher.submit("k", ["abandoned"], [1]))
    await until(lambda: batcher.queued_items == 1)  # queued behind it
    gone.cancel()
    recorder.gate.set()
    assert await keep == ["out:first"]
    # The queue is FIFO: once a later request is answered, the abandoned one was dropped or sent before it.
    assert await batcher.submit("k", ["probe"], [1]) == ["out:probe"]
    assert recorder.batches == [["first"], ["probe"]]
    assert batcher.queued_items == 0
    await batcher.close()


async def test_a_failed_batch_fails_only_its_requests() -> None:
    calls = 0

    async def flaky(key: object, items: list[str]) -> BatchReport:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise SIEError("MODEL_LOADING", "worker died")
        return BatchReport(items)

    batcher = Batcher("m", flaky, BatchLimits(max_wait_ms=0, max_items=1, in_flight=1))
    batcher.start()
    first = asyncio.create_task(batcher.submit("k", ["a"], [1]))
    second = asyncio.create_task(batcher.submit("k", ["b"], [1]))
    with pytest.raises(SIEError):
        await first
    assert await second == ["b"]
    await batcher.close()


async def test_a_bad_input_fails_only_its_own_request_when_batched_with_others() -> None:
    calls: list[list[str]] = []

    async def strict(key: object, items: list[str]) -> BatchReport:
        calls.append(sorted(items))
        if "corrupt" in items:
            raise SIEError("INVALID_INPUT", "image data is not a decodable image")
        return BatchReport([f"ok:{item}" for item in items])

    batcher = Batcher("m", strict, BatchLimits(max_wait_ms=20, in_flight=1))
    batcher.start()
    blocker = asyncio.create_task(batcher.submit("k", ["first"], [1]))  # makes the next ones queue together
    await asyncio.sleep(0)
    tasks = [asyncio.create_task(batcher.submit("k", [name], [1])) for name in ("a", "corrupt", "b")]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert await blocker == ["ok:first"]
    assert results[0] == ["ok:a"] and results[2] == ["ok:b"]
    assert isinstance(results[1], SIEError) and results[1].code == "INVALID_INPUT"
    assert ["a", "b", "corrupt"] in calls  # they did share a batch, which was then split
    await batcher.close()


async def test_while_the_worker_is_busy_the_next_batch_leaves_when_the_worker_is_about_to_need_it() -> None:
    recorder = Gated(busy_s=30.0)  # each batch reports 30 s of work: the pacer holds the next one back that long
    batcher = make(recorder, max_wait_ms=2)
    recorder.gate.set()
    await batcher.submit("k", ["warm"], [10])  # the pacer learns 3 s per unit of cost
    recorder.gate.clear()
    first = asyncio.create_task(batcher.submit("k", ["first"], [10]))  # an idle worker: sent at once
    await until(lambda: recorder.batches[-1] == ["first"])
    late = []
    for i in range(5):  # arrive while `first` runs, further apart than max_wait_ms
        late.append(asyncio.create_task(batcher.submit("k", [f"late{i}"], [10])))
        await asyncio.sleep(0.01)
    await until(lambda: batcher.queued_items == 5)
    # Without pacing the first of them would have left alone, 2 ms after it arrived: held back, they are all here.
    assert recorder.batches == [["warm"], ["first"]]
    recorder.gate.set()  # `first` is done: the worker needs the next batch now
    await asyncio.gather(first, *late)
    assert sorted(recorder.batches[2]) == [f"late{i}" for i in range(5)] and len(recorder.batches) == 3
    await batcher.close()


async def test_a_full_batch_does_not_wait_for_the_pace() -> None:
    recorder = Gated(busy_s=30.0)  # the pace would hold a batch back for 30 s
    batcher = make(recorder, max_items=2)
    recorder.gate.set()
    await batcher.submit("k", ["warm"], [1])
    recorder.gate.clear()
    running = asyncio.create_task(batcher.submit("k", ["a"], [1]))
    await until(lambda: recorder.batches[-1] == ["a"])
    full = asyncio.create_task(batcher.submit("k", ["b", "c"], [1, 1]))
    await until(lambda: len(recorder.batches) == 3)  # sent while `a` still runs, long before the pace says
    assert sorted(recorder.batches[-1]) == ["b", "c"] and not running.done()
    recorder.gate.set()
    await asyncio.gather(running, full)
    await batcher.close()


def test_the_pacer_predicts_from_the_workers_own_timing() -> None:
    pacer = Pacer()
    assert pacer.send_by() is not None  # nothing outstanding: send now
    first = pacer.sent(100)
    assert pacer.send_by() is None  # busy, pace unknown: the batcher falls back to max_wait_ms
    pacer.done(first, BatchReport([], busy_s=0.5, prepare_s=0.01))  # 5 ms per unit, whatever the wall clock said
    before = time.perf_counter()
    second = pacer.sent(10)
    pacer.sent(20)
    send_by = pacer.send_by()
    assert send_by is not None
    assert before + 0.15 - 0.011 <= send_by <= time.perf_counter() + 0.15 - 0.011  # both batches, less the lead
    pacer.done(second, None)  # a failed batch teaches nothing
    assert pacer.fit.predict(10) == 0.05


def test_the_pacer_learns_the_fixed_cost_of_a_batch() -> None:
    fit = BusyTimeFit()
    for cost in [1, 40, 3, 64, 8, 32, 1, 50] * 4:  # 2 ms a call plus 0.1 ms a token, as a CPU worker behaves
        fit.add(cost, 0.002 + 0.0001 * cost)
    assert fit.predict(1) == pytest.approx(0.0021) and fit.predict(100) == pytest.approx(0.012)


async def test_the_batching_loop_survives_an_exception_and_serves_again(caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    batcher = make(recorder, max_wait_ms=0)
    real_fill = batcher._fill
    failures = []

    async def flaky_fill() -> None:
        if not failures:
            failures.append(1)
            raise RuntimeError("injected")
        await real_fill()

    batcher._fill = flaky_fill  # type: ignore[method-assign]
    assert await asyncio.wait_for(batcher.submit("k", ["a"], [1]), 5) == ["out:a"]  # served by the restarted loop
    assert failures and "model 'm'" in caplog.text and "injected" in caplog.text
    assert await batcher.submit("k", ["b"], [1]) == ["out:b"]
    await batcher.close()


async def test_a_failure_while_forming_a_batch_loses_no_request(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder()
    batcher = make(recorder, max_wait_ms=0, in_flight=1)
    real_window = batcher_module.itertools_islice
    failures = []

    def flaky_window(queue: Any, n: int) -> list[Any]:
        if not failures:
            failures.append(1)
            raise RuntimeError("injected while choosing a batch")
        return real_window(queue, n)

    monkeypatch.setattr(batcher_module, "itertools_islice", flaky_window)
    assert await asyncio.wait_for(batcher.submit("k", ["a"], [1]), 5) == ["out:a"]  # still queued, then served
    assert failures == [1] and batcher.queued_items == 0
    await batcher.close()
