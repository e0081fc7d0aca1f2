"""The supervisor with real worker processes (`python -m sie_worker`, fake adapter) over real ZeroMQ sockets:
spawn and handshake, load failures by class, a hung worker killed at its deadline, a frozen one found by its ping, a
frozen load killed at the load deadline, the restart back-off, and a clean stop."""

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

import msgspec
import psutil
import pytest

from sie_router.errors import LoadError
from sie_router.pool.ipc import WorkerLost
from sie_router.pool.pacing import BusyTimeFit
from sie_router.pool.restarts import Restarts
from sie_router.pool.supervisor import (
    HUNG_FACTOR,
    MIN_FACTOR,
    STOP_MIN_S,
    TERM_GRACE_S,
    Supervisor,
    Worker,
    batch_deadline,
)
from sie_router.settings import Settings
from sie_sdk.codes import ErrorCode
from sie_worker.cuda import EXIT_DEVICE_FAULT
from sie_worker.options import FakeOptions
from sie_worker.protocol import (
    BatchDone,
    BatchFailed,
    BatchTiming,
    EncodeBatch,
    EncodeResult,
    InputItem,
    LoadErrorClass,
    LoadFailed,
    Ready,
    WorkerSpec,
)

# Pings off unless a test turns them on: a worker frozen on purpose must be found by the mechanism under test.
SETTINGS = Settings(batch_timeout_s=2.0, batch_timeout_floor_s=1.0, load_timeout_s=60, ping_interval_s=0)


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
    """The protocol and the family options it carries, the one reader of sentence-transformers files and the steps it
    computes (family inference), and the logs and traces both processes write; none of them pulls torch or
    transformers."""
    code = ("import sys, sie_router.app, sie_router.pool.supervisor; "
            "print(sorted(m for m in sys.modules if m.startswith('sie_worker')), "
            "[m for m in ('torch', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("['sie_worker', 'sie_worker.options', 'sie_worker.protocol', 'sie_worker.st_layout', "
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
        assert supervisor.restarts.of("test/fake").restarts == 0 and worker.backoff_s is None  # a stop is no crash

    [(_, code)] = run(scenario)
    assert code == 0  # Shutdown, then a wait for the exit: no signal reaches a worker that stops when told


def test_an_export_announced_just_before_ready_still_reaches_placement() -> None:
    """The worker says `ExportStarting`, then `Ready`: however the two arrive, apart or in the same instant on a busy
    router (here both are in before the handshake looks), the export's callback runs once, before the worker is handed
    over; a `LoadFailed` skips it."""
    ready = Ready(worker_id="w", model="test/fake", device="cpu", memory_bytes=1, dims={}, capabilities=[],
                  engine="fake")
    failed = LoadFailed(worker_id="w", code=ErrorCode.INTERNAL_ERROR, error_class=LoadErrorClass.CONFIG,
                        message="x")

    async def scenario(supervisor: Supervisor, exits: list[tuple[Worker, int | None]]) -> None:
        for answer, expected in ((ready, [True]), (failed, [])):
            exports: list[bool] = []

            async def on_export(exports: list[bool] = exports) -> None:
                exports.append(True)

            loop = asyncio.get_running_loop()
            handshake, export = loop.create_future(), loop.create_future()
            export.set_result(None)
            handshake.set_result(answer)
            worker = Worker(worker_id="w", key="test/fake", process=None, device="cpu")  # type: ignore[arg-type]
            assert await supervisor._handshake(worker, handshake, export, on_export) is answer
            assert exports == expected
        announced: list[bool] = []

        async def on_real_export() -> None:
            announced.append(True)

        real = await supervisor.spawn(spec(supervisor, announce_export=True), "test/fake", on_real_export)
        assert real.info is not None and announced == [True]
        await supervisor.stop([real], 10)

    run(scenario)


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
        assert supervisor.restarts.left("test/fake") == 0  # the failed load started no back-off

    run(scenario)


def test_a_hung_worker_is_killed_at_its_deadline_and_its_model_backs_off() -> None:
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
        backoff = supervisor.restarts.of("test/fake")
        assert worker.backoff_s == SETTINGS.restart_backoff_s and backoff.restarts == 1
        assert 0 < backoff.left() <= SETTINGS.restart_backoff_s

    [(_, code)] = run(scenario)
    assert code == -signal.SIGKILL


def test_a_frozen_idle_worker_is_found_by_its_ping_and_killed() -> None:
    settings = msgspec.structs.replace(SETTINGS, ping_interval_s=0.2, ping_timeout_s=1.0)

    async def scenario(supervisor: Supervisor, exits: list[tuple[Worker, int | None]]) -> None:
        worker = await supervisor.spawn(spec(supervisor), "test/fake")
        pinged_before = supervisor.client.answered[worker.worker_id]
        await until(lambda: supervisor.client.answered.get(worker.worker_id, 0) > pinged_before)  # it answers
        os.kill(worker.process.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        await until(lambda: bool(exits))  # no batch was sent: only the ping can find it
        assert time.monotonic() - stopped < 10
        assert worker.backoff_s is not None

    [(_, code)] = run(scenario, settings)
    assert code == -signal.SIGKILL


def test_a_busy_worker_answers_pings_beside_its_batch() -> None:
    """A batch that runs for seconds is no freeze: the thread that receives batches answers pings meanwhile."""
    settings = msgspec.structs.replace(SETTINGS, ping_interval_s=0.1, ping_timeout_s=1.0, batch_timeout_s=30)

    async def scenario(supervisor: Supervisor, exits: list[tuple[Worker, int | None]]) -> None:
        worker = await supervisor.spawn(spec(supervisor, batch_delay_s=3.0), "test/fake")
        call = asyncio.create_task(supervisor.call(worker, encode, BusyTimeFit(), 1))
        answers = []
        while not call.done():
            answers.append(supervisor.client.answered[worker.worker_id])
            await asyncio.sleep(0.05)
        assert isinstance(call.result(), BatchDone) and not exits
        assert len(set(answers)) >= 3  # answered pings while the 3 s batch ran

    run(scenario, settings)


def test_the_answer_a_worker_flushed_before_it_exited_is_read_before_its_calls_fail() -> None:
    """A broken CUDA context answers its batch, then the worker exits: the answer, not the exit, is what the caller
    gets, though the exit may be seen first."""
    async def scenario(supervisor: Supervisor, exits: list[tuple[Worker, int | None]]) -> None:
        worker = await supervisor.spawn(spec(supervisor, cuda_error_on_batch=1), "test/fake")
        reply = await supervisor.call(worker, encode, BusyTimeFit(), 1)
        assert isinstance(reply, BatchFailed) and reply.code is ErrorCode.INFERENCE_ERROR
        assert "illegal memory access" in reply.message
        await until(lambda: bool(exits))
        assert worker.backoff_s is not None  # its exit is a crash all the same

    [(_, code)] = run(scenario)
    assert code == EXIT_DEVICE_FAULT


def test_a_frozen_load_is_killed_at_the_load_deadline() -> None:
    settings = msgspec.structs.replace(SETTINGS, load_timeout_s=3.0)

    async def scenario(supervisor: Supervisor, exits: list[tuple[Worker, int | None]]) -> None:
        loading = asyncio.create_task(supervisor.spawn(spec(supervisor, load_delay_s=60), "test/fake"))
        await until(lambda: bool(supervisor.workers))
        (worker,) = supervisor.workers.values()
        os.kill(worker.process.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(LoadError) as failed:
            await loading
        assert failed.value.error_class is LoadErrorClass.TIMEOUT and not failed.value.permanent
        await until(lambda: bool(exits))
        assert time.monotonic() - started < settings.load_timeout_s + 5  # at the deadline, not after a grace
        assert not psutil.pid_exists(worker.process.pid)
        assert supervisor.restarts.left("test/fake") == 0  # a load failure, not a crash

    [(_, code)] = run(scenario, settings)
    assert code == -signal.SIGKILL


def test_a_worker_that_ignores_shutdown_gets_sigterm_then_sigkill_after_the_wait() -> None:
    async def scenario(supervisor: Supervisor, exits: list[tuple[Worker, int | None]]) -> None:
        worker = await supervisor.spawn(spec(supervisor), "test/fake")
        os.kill(worker.process.pid, signal.SIGSTOP)  # it cannot read Shutdown, nor act on SIGTERM
        started = time.monotonic()
        await supervisor.stop([worker], 0.5)
        assert STOP_MIN_S <= time.monotonic() - started < STOP_MIN_S + TERM_GRACE_S + 5
        await until(lambda: bool(exits))
        assert worker.backoff_s is None  # stopped: no crash

    [(_, code)] = run(scenario)
    assert code == -signal.SIGKILL


def test_the_back_off_doubles_to_its_cap_and_resets_after_a_healthy_run() -> None:
    restarts = Restarts(Settings(restart_backoff_s=0.5, restart_backoff_max_s=4, restart_backoff_reset_s=60))
    delays = [restarts.crashed("m", served_s=1.0, now=100.0) for _ in range(6)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert restarts.of("m").left(now=101.0) == 3.0 and restarts.of("m").restarts == 6
    assert restarts.crashed("m", served_s=60.0, now=200.0) == 0.5  # served a minute: a new sequence
    assert restarts.of("m").in_a_row == 1 and restarts.of("m").restarts == 7
    restarts.forget("m")
    assert restarts.of("m").restarts == 0 and restarts.left("m") == 0


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
