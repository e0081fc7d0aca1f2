"""The worker pool without worker processes: slots and the worker client driven by the test, for what needs no real
worker (its loops, its queues and pace, the one clock of use, and a job's one `ensure`)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from sie_router import metrics
from sie_router.errors import LoadError, SIEError
from sie_router.models.registry import build_registry
from sie_router.pipeline.jobs import BatchKey, EncodeJob, Resolved, TokenizeJob
from sie_router.pipeline.service import Service
from sie_router.pool import eviction
from sie_router.pool.devices import detect
from sie_router.pool.loader import cooldown
from sie_router.pool.pool import WorkerPool
from sie_router.pool.slots import ModelState, Slot
from sie_router.pool.supervisor import Worker
from sie_router.settings import Settings
from sie_sdk.codes import ErrorCode
from sie_worker.protocol import (
    BatchDone,
    BatchTiming,
    EncodeBatch,
    EncodeResult,
    InputItem,
    LoadErrorClass,
    Ready,
    Tensor,
    TokenizeBatch,
    TokenizeResult,
)

MODEL = "test/fake-dense"


class GoneProcess:
    """A worker process that has already exited: stopping it is a no-op."""

    pid = 0

    def is_alive(self) -> bool:
        return False

    def terminate(self) -> None: ...
    def kill(self) -> None: ...
    def join(self, timeout: float) -> None: ...


@pytest.fixture
async def pool(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[WorkerPool]:
    monkeypatch.setattr(eviction, "IDLE_CHECK_S", 0.01)
    started = WorkerPool(Settings(bundle="test", idle_ttl_s=0.05), build_registry("test", (), (), offline=True),
                         detect("cpu"))
    await started.start()
    yield started
    await started.shutdown()


def loaded(pool: WorkerPool, key: str) -> Worker:
    """A slot that looks loaded, its worker last used long ago."""
    worker = Worker(worker_id="w", key=key, process=GoneProcess(), device="cpu")  # type: ignore[arg-type]
    pool.placement.reserve(key, "cpu", 1)
    pool.ledger.recency[key] = time.monotonic() - 60
    slot = pool.slots[key]
    slot.state, slot.worker = ModelState.LOADED, worker
    return worker


async def test_the_idle_evictor_survives_an_exception_and_evicts_again(pool: WorkerPool,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    real, failures = pool.evictor.evictable, []

    def flaky(key: str) -> bool:
        if not failures:
            failures.append(key)
            raise RuntimeError("injected")
        return real(key)

    pool.evictor.evictable = flaky  # type: ignore[method-assign]
    loaded(pool, MODEL)
    async with asyncio.timeout(5):
        while pool.slots[MODEL].worker is not None:  # evicted by the restarted loop
            await asyncio.sleep(0.01)
    assert failures and pool.slots[MODEL].state == ModelState.AVAILABLE
    assert "idle eviction" in caplog.text and "injected" in caplog.text
    assert f"model '{failures[0]}'" in caplog.text  # the exception names the model it was checking


def ready(pool: WorkerPool, key: str) -> Worker:
    """A loaded slot whose worker has said Ready."""
    worker = loaded(pool, key)
    worker.info = Ready(worker_id="w", model=key, device="cpu", memory_bytes=1, dims={"dense": 2}, capabilities=[],
                        engine="fake")
    return worker


def answer_every_call(pool: WorkerPool, deadlines: list[float]) -> None:
    """The worker client answers each batch with one dense row per item, 400 ms of the worker's time, and a tokenize
    call with tokens and no timing."""

    async def call(worker_id: str, make: Any, deadline_s: float) -> BatchDone:
        deadlines.append(deadline_s)
        message = make(7)
        if isinstance(message, TokenizeBatch):  # no forward pass: no timing
            return BatchDone(batch_id=7, result=TokenizeResult(token_counts=[1], texts=["x"]))
        rows = len(message.items)
        dense = Tensor.from_numpy(np.ones((rows, 2), dtype=np.float32))
        return BatchDone(batch_id=7, result=EncodeResult(token_counts=[1] * rows, dense=dense),
                         timing=BatchTiming(inference_ms=400.0))

    pool.supervisor.client.call = call  # type: ignore[method-assign]


def job(pool: WorkerPool, texts: list[str]) -> EncodeJob:
    config, profile = pool.registry.lookup(MODEL)
    return EncodeJob(Resolved(MODEL, config, profile), [InputItem(text=t) for t in texts],
                     BatchKey("encode", output_types=("dense",)), wait_s=1.0)


async def test_a_job_makes_sure_of_its_model_once_and_its_batches_use_that_worker(pool: WorkerPool) -> None:
    worker, deadlines = ready(pool, MODEL), []
    answer_every_call(pool, deadlines)
    ensured = []
    real_ensure = pool.ensure

    async def counting_ensure(model: str, wait_s: float | None, *, evict: bool = True) -> Worker:
        ensured.append(model)
        return await real_ensure(model, wait_s, evict=evict)

    pool.ensure = counting_ensure  # type: ignore[method-assign]
    service = Service(pool.settings, pool)
    encoded = await service.run(job(pool, ["a", "b"]))
    assert ensured == [MODEL] and encoded.dense is not None and encoded.dense.shape == (2, 2)
    assert worker.batches_served == 1
    tokens = await service.run(TokenizeJob(job(pool, []).model, texts=["a"], wait_s=1.0))
    assert ensured == [MODEL, MODEL] and tokens is not None  # a tokenize job too: once


async def test_the_pool_owns_each_model_s_queue_and_its_one_pace(pool: WorkerPool) -> None:
    ready(pool, MODEL)
    deadlines: list[float] = []
    answer_every_call(pool, deadlines)
    service = Service(pool.settings, pool)
    await service.run(job(pool, ["a"]))
    slot = pool.slots[MODEL]
    assert slot.batcher is not None and slot.batcher.pacer.fit is slot.pace  # the queue learns the pool's pace
    assert pool.queue(MODEL, lambda key, items: None) is slot.batcher  # type: ignore[arg-type,return-value]
    learned = slot.pace.predict(10)
    assert learned is not None and learned > 0.1  # learned from the worker's 400 ms
    assert deadlines[0] == pool.settings.batch_timeout_s  # the first batch: pace unknown, the full deadline
    await service.run(TokenizeJob(job(pool, []).model, texts=["a"], wait_s=1.0))
    assert slot.pace.predict(10) == learned  # a tokenize answer teaches nothing: it never goes through the queue
    assert deadlines[-1] == pool.settings.batch_timeout_floor_s  # ...and is timed from the pace the queue learned
    assert pool.queued_items() == 0


async def test_one_clock_of_use_and_a_batch_after_the_worker_went_is_retryable(pool: WorkerPool) -> None:
    worker = ready(pool, MODEL)
    answer_every_call(pool, [])
    before = pool.placement.last_used(MODEL)
    assert before is not None
    await pool.run_batch(worker, lambda bid: EncodeBatch(batch_id=bid, items=[InputItem(text="x")],
                                                         output_types=["dense"]), 1, 3)
    used = pool.placement.last_used(MODEL)
    assert used is not None and used > before  # the idle TTL, LRU eviction and the admin listing read this one
    assert pool.ready_worker(MODEL) is worker
    pool.slots[MODEL].worker = None  # the worker exited after its job made sure of it
    with pytest.raises(SIEError) as gone:
        pool.ready_worker(MODEL)
    assert gone.value.code is ErrorCode.MODEL_LOADING


async def test_a_crashed_worker_s_model_answers_its_back_off_then_the_pool_loads_it_again(
        pool: WorkerPool, monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[tuple[str, bool]] = []
    monkeypatch.setattr(pool.loader, "start", lambda slot, evict: loads.append((slot.key, evict)))
    worker = loaded(pool, MODEL)
    worker.backoff_s = pool.supervisor.restarts.crashed(MODEL, served_s=1.0)  # as the sentinel does for a crash
    pool._on_exit(worker, -9)
    with pytest.raises(SIEError) as refused:
        await pool.ensure(MODEL, wait_s=30)  # even a route that waits for loads is told to come back
    left = refused.value.extra["backoff_s"]
    assert refused.value.code is ErrorCode.MODEL_LOADING and 0 < left <= pool.settings.restart_backoff_s
    assert refused.value.retry_after == 1 and refused.value.extra["restarts"] == 1  # Retry-After: whole seconds
    assert loads == []
    deadline = time.monotonic() + 10
    while not loads:  # the back-off ends: the pool starts the next worker itself, evicting nothing for it
        assert time.monotonic() < deadline, "no restart after the back-off"
        await asyncio.sleep(0.01)
    assert loads == [(MODEL, False)]


async def test_a_permanent_load_failure_stays_failed_until_the_operator_evicts(pool: WorkerPool) -> None:
    slot = pool.slots[MODEL]
    for error_class, permanent in ((LoadErrorClass.CONFIG, True), (LoadErrorClass.STORAGE, False)):
        slot.state, slot.load_error = ModelState.FAILED, LoadError(error_class, "injected")
        slot.failed_at = time.monotonic() - 10 * cooldown(pool.settings, slot.load_error)  # long past any cooldown
        if permanent:
            with pytest.raises(LoadError) as failed:
                pool.loader.check_failed(slot)
            assert failed.value.permanent and failed.value.code is ErrorCode.MODEL_LOAD_FAILED
        else:
            pool.loader.check_failed(slot)  # a passing failure: the next request loads again
    slot.load_error = LoadError(LoadErrorClass.CONFIG, "injected")
    await pool.evict(MODEL, reason="admin")
    assert slot.state == ModelState.AVAILABLE and slot.load_error is None
    pool.loader.check_failed(slot)


def refused_loads(key: str) -> float:
    return metrics.REGISTRY.get_sample_value("sie_model_loads_total", {"model": key, "result": "refused"}) or 0.0


@pytest.fixture
async def small_pool(request: pytest.FixtureRequest) -> AsyncIterator[WorkerPool]:
    """350 MiB, of which test/fake-b (pinned, so never evicted) holds 100: test/fake-a's 300 MiB does not fit. A
    refusal holds an hour unless a test's `indirect` parameter says otherwise, so that how fast a test runs cannot
    matter."""
    hold_s = getattr(request, "param", 3600.0)
    started = WorkerPool(Settings(bundle="test", memory_budget=350 * 2**20, pinned=("test/fake-b",),
                                  load_refusal_hold_s=hold_s),
                         build_registry("test", (), (), offline=True), detect("cpu"))
    await started.start()
    worker = loaded(started, "test/fake-b")
    started.placement.reserve(worker.key, "cpu", 100 * 2**20)
    yield started
    await started.shutdown()


def record_loads(pool: WorkerPool, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Loads the pool starts from now on, recorded instead of run (each stays loading)."""
    loads: list[tuple[str, bool]] = []

    def start(slot: Slot, evict: bool) -> None:
        loads.append((slot.key, evict))
        slot.loading = asyncio.get_running_loop().create_future()  # type: ignore[assignment]
        slot.placed.set()  # as if placement had reserved its memory

    monkeypatch.setattr(pool.loader, "start", start)
    return loads


async def refuse_first_load(pool: WorkerPool, key: str, evict: bool = True) -> None:
    """The request that starts the load (one that waits for no load, as the native route's) is answered with
    placement's refusal, not MODEL_LOADING: a client coming back after MODEL_LOADING's Retry-After would find the
    refusal's hold over, start the next load, and be told MODEL_LOADING again, forever."""
    with pytest.raises(SIEError) as first:
        await pool.ensure(key, None, evict=evict)
    assert first.value.code is ErrorCode.RESOURCE_EXHAUSTED, first.value
    assert first.value.retry_after == max(1, math.ceil(pool.settings.load_refusal_hold_s))
    assert pool.slots[key].loading is None


async def test_a_load_refused_for_memory_is_every_polls_answer_until_memory_is_freed(
        small_pool: WorkerPool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's loop: each poll of a cold model started a load that placement refused again, and the native route
    answered MODEL_LOADING 239 times in a row. Now the refusal is the answer, and no poll starts a load while it
    stands; freeing memory lifts it."""
    pool, key, before = small_pool, "test/fake-a", refused_loads("test/fake-a")
    await refuse_first_load(pool, key)
    for wait_s in [None] * 20 + [30.0]:  # polls, then a route that waits out loads
        with pytest.raises(SIEError) as refused:
            await pool.ensure(key, wait_s)
        assert refused.value.code is ErrorCode.RESOURCE_EXHAUSTED and refused.value.retry_after >= 1
        assert "needs about 300 MiB on cpu, 250 MiB is free" in refused.value.message
        assert pool.slots[key].loading is None
    assert refused_loads(key) - before == 1
    loads = record_loads(pool, monkeypatch)
    pool.placement.release("test/fake-b")  # its worker stopped: memory freed
    with pytest.raises(SIEError):
        await pool.ensure(key, None)
    assert loads == [(key, True)]


@pytest.mark.parametrize("small_pool", [0.0], indirect=True)  # no hold
async def test_a_refusal_stands_no_longer_than_its_hold(small_pool: WorkerPool,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """With no hold left, each poll tries placement again (busy models may have become idle, and evictable)."""
    pool, key, before = small_pool, "test/fake-a", refused_loads("test/fake-a")
    for attempt in range(1, 4):
        await refuse_first_load(pool, key)
        assert refused_loads(key) - before == attempt


async def test_a_refusal_without_eviction_does_not_hold_back_a_request_that_may_evict(
        small_pool: WorkerPool, monkeypatch: pytest.MonkeyPatch) -> None:
    pool, key = small_pool, "test/fake-a"
    await refuse_first_load(pool, key, evict=False)  # a preload, or a restart after a crash's back-off
    with pytest.raises(SIEError) as held:
        await pool.ensure(key, None, evict=False)
    assert held.value.code is ErrorCode.RESOURCE_EXHAUSTED
    loads = record_loads(pool, monkeypatch)
    with pytest.raises(SIEError):
        await pool.ensure(key, None)
    assert loads == [(key, True)]


async def test_an_export_reserves_its_helper_evicting_idle_models_or_is_refused(small_pool: WorkerPool) -> None:
    pool, key = small_pool, "test/fake-a"
    pool.placement.release("test/fake-b")
    pool.placement.reserve(loaded(pool, "test/fake-growing").key, "cpu", 100 * 2**20)  # idle, so evictable
    pool.placement.reserve(key, "cpu", 10 * 2**20)
    with pytest.raises(SIEError) as refused:  # 350 MiB cannot hold a helper (over 512 MiB) whatever goes
        await pool.loader.reserve_export(pool.slots[key], evict=True)
    assert refused.value.code is ErrorCode.RESOURCE_EXHAUSTED and "exporting its graph" in refused.value.message
    assert pool.ledger.reserved(key) == 10 * 2**20
    room = 10 * 2**20 + pool.placement.export_estimate(key) + 8 * 2**20  # the helper fits once the idle model goes
    pool.ledger.devices["cpu"].budget = pool.ledger.devices["cpu"].limit = room
    await pool.loader.reserve_export(pool.slots[key], evict=True)
    assert pool.ledger.reserved(key) == 10 * 2**20 + pool.placement.export_estimate(key)
    assert pool.slots["test/fake-growing"].worker is None, "the idle model made room for the helper"
