"""The supervisor with real worker processes (`python -m sie_worker`, fake adapter) over real ZeroMQ sockets:
spawn and handshake, load failures by class, a hung worker killed at its deadline, the crash budget, stop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from sie_router.errors import LoadError
from sie_router.pool.ipc import WorkerLost
from sie_router.pool.pacing import BusyTimeFit
from sie_router.pool.supervisor import HUNG_FACTOR, MIN_FACTOR, Supervisor, Worker, batch_deadline
from sie_router.settings import Settings
from sie_worker.protocol import (
    BatchDone,
    BatchTiming,
    EncodeBatch,
    EncodeResult,
    FakeOptions,
    InputItem,
    LoadErrorClass,
    WorkerSpec,
)

SETTINGS = Settings(batch_timeout_s=2.0, batch_timeout_floor_s=1.0, crash_budget=1, load_timeout_s=60)


def spec(supervisor: Supervisor, **faults: Any) -> WorkerSpec:
    client = supervisor.client
    return WorkerSpec(worker_id=uuid.uuid4().hex[:12], model="test/fake", adapter="fake", weights_dir="",
                      to_worker_endpoint=client.to_worker_endpoint, from_worker_endpoint=client.from_worker_endpoint,
                      options=FakeOptions(dim=4, **faults), threads=1)


def encode(batch_id: int) -> EncodeBatch:
    return EncodeBatch(batch_id=batch_id, items=[InputItem(text="hello")], output_types=["dense"])


Scenario = Callable[[Supervisor, list[tuple[Worker, int | None]]], Awaitable[None]]


def run(scenario: Scenario, settings: Settings = SETTINGS) -> list[tuple[Worker, int | None]]:
    exits: list[tuple[Worker, int | None]] = []

    async def main() -> None:
        supervisor = Supervisor(settings, on_exit=lambda worker, code: exits.append((worker, code)))
        supervisor.start()
        try:
            await scenario(supervisor, exits)
        finally:
            await supervisor.stop(list(supervisor.workers.values()), 5)
            await supervisor.close()

    asyncio.run(main())
    return exits


async def until(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def test_the_router_imports_only_the_shared_torch_free_modules_of_the_worker_package() -> None:
    """The protocol, the one reader of sentence-transformers files and the steps it computes (family inference), and
    the logs and traces both processes write; none of them pulls torch or transformers."""
    code = ("import sys, sie_router.app, sie_router.pool.supervisor; "
            "print(sorted(m for m in sys.modules if m.startswith('sie_worker')), "
            "[m for m in ('torch', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("['sie_worker', 'sie_worker.protocol', 'sie_worker.st_layout', "
                           "'sie_worker.st_pipeline', 'sie_worker.telemetry'] []")


def test_spawn_handshake_call_and_stop() -> None:
    async def scenario(supervisor: Supervisor, exits: list[tuple[Worker, int | None]]) -> None:
        worker = await supervisor.spawn(spec(supervisor), "test/fake")
        assert worker.info is not None and worker.info.pid == worker.process.pid
        assert psutil.Process(worker.process.pid).cmdline()[0] == "sie-worker:test/fake@cpu"  # its title
        reply = await supervisor.call(worker, encode, BusyTimeFit(), 1)
        assert isinstance(reply, BatchDone) and reply.result.token_counts == [1]
        await supervisor.stop([worker], 10)
        await until(lambda: bool(exits))
        assert not psutil.pid_exists(worker.process.pid)
        assert supervisor.recent_crashes("test/fake") == 0  # a stop is no crash

    [(_, code)] = run(scenario)
    assert code in (0, -signal.SIGTERM)  # Shutdown, then SIGTERM at once: it may still be tearing down when hit


def test_a_load_failure_is_classified_by_type_and_is_no_crash(tmp_path: Path) -> None:
    async def scenario(supervisor: Supervisor, exits: list[tuple[Worker, int | None]]) -> None:
        with pytest.raises(LoadError) as failed:
            await supervisor.spawn(spec(supervisor, fail_loads=1, fail_loads_file=str(tmp_path / "n")), "test/fake")
        assert failed.value.error_class is LoadErrorClass.STORAGE and not failed.value.permanent
        assert "Too many open files" in failed.value.message
        await until(lambda: bool(exits))
        worker = await supervisor.spawn(spec(supervisor, fail_loads=1, fail_loads_file=str(tmp_path / "n")),
                                        "test/fake")  # the second load succeeds
        assert worker.info is not None
        supervisor.check_crash_budget("test/fake")  # the failed load did not spend the budget of 1

    run(scenario)


def test_a_hung_worker_is_killed_at_its_deadline_and_spends_the_crash_budget() -> None:
    async def scenario(supervisor: Supervisor, exits: list[tuple[Worker, int | None]]) -> None:
        worker = await supervisor.spawn(spec(supervisor), "test/fake")
        pace = BusyTimeFit()
        for _ in range(3):  # its pace, as its queue learns it: a batch of one takes milliseconds
            assert isinstance(await supervisor.call(worker, encode, pace, 1), BatchDone)
            pace.add(1, 0.002)
        assert batch_deadline(pace, 1, 1.0, 2.0) == 1.0  # so the deadline is the floor
        os.kill(worker.process.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(WorkerLost, match="no progress"):
            await supervisor.call(worker, encode, pace, 1)
        assert 1.0 <= time.monotonic() - started < 10
        await until(lambda: bool(exits))
        assert not psutil.pid_exists(worker.process.pid)
        with pytest.raises(LoadError, match="crashed 1 times") as spent:
            supervisor.check_crash_budget("test/fake")
        assert spent.value.error_class is LoadErrorClass.ENGINE and not spent.value.permanent

    [(_, code)] = run(scenario)
    assert code == -signal.SIGKILL


def test_the_deadline_scales_with_the_batch_within_floor_and_cap() -> None:
    pace = BusyTimeFit()
    assert batch_deadline(pace, 64, 10, 30) == 30  # pace unknown: the operator's bound
    for items, seconds in ((1, 0.011), (8, 0.018), (32, 0.042), (64, 0.074)):  # 10 ms a batch + 1 ms an item
        pace.add(items, seconds)
    assert batch_deadline(pace, 1, 10, 30) == 10  # fast batches: the floor
    expected = pace.predict(1000)
    assert expected is not None and abs(expected - 1.01) < 0.01
    assert batch_deadline(pace, 1000, 10, 30) == pytest.approx(HUNG_FACTOR * expected)  # ~20 s: scaled
    assert batch_deadline(pace, 5000, 10, 30) == 30  # ~5 s expected: the operator's bound wins over 20x
    slow = pace.predict(20_000)
    assert slow is not None and batch_deadline(pace, 20_000, 10, 30) == pytest.approx(MIN_FACTOR * slow)  # ~60 s


def test_a_call_s_deadline_comes_from_the_pace_it_is_given_for_its_cost() -> None:
    """The supervisor learns nothing itself: the model's queue learns its pace from the worker's own timing (a tokenize
    answer never reaches the queue), and each call is timed from that pace for the batch's cost."""
    deadlines: list[float] = []

    async def scenario(supervisor: Supervisor, exits: list[tuple[Worker, int | None]]) -> None:
        async def answer(worker_id: str, make: Any, deadline_s: float) -> BatchDone:
            deadlines.append(deadline_s)
            return BatchDone(batch_id=1, result=EncodeResult(token_counts=[3]), timing=BatchTiming(inference_ms=400.0))

        supervisor.client.call = answer  # type: ignore[method-assign]
        worker = Worker(worker_id="w", key="test/fake", process=None, device="cpu")  # type: ignore[arg-type]
        pace = BusyTimeFit()
        await supervisor.call(worker, encode, pace, 50)
        assert pace.predict(50) is None  # nothing learned here
        for cost, seconds in ((10, 0.011), (50, 0.051), (100, 0.101)):
            pace.add(cost, seconds)
        await supervisor.call(worker, encode, pace, 10)
        await supervisor.call(worker, encode, pace, 2000)

    run(scenario)
    assert deadlines[0] == SETTINGS.batch_timeout_s  # pace unknown: the operator's bound
    assert deadlines[1] == SETTINGS.batch_timeout_floor_s  # a fast batch: the floor
    assert deadlines[2] == pytest.approx(MIN_FACTOR * 2.001, rel=0.01)  # a slow one: never under 3x its pace
