"""The worker client over real ZeroMQ sockets, with fake workers in the test: calls, deadlines, bad frames."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import numpy as np
import pytest
import zmq
import zmq.asyncio

from sie_router.pool.ipc import WorkerClient, WorkerLost
from sie_sdk.codes import ErrorCode
from sie_worker import protocol
from sie_worker.protocol import (
    BatchDone,
    BatchFailed,
    EncodeBatch,
    EncodeResult,
    InputItem,
    LoadFailed,
    Ready,
    Tensor,
)

GARBAGE = b"\xc1 is never valid msgpack"


class FakeWorker:
    """A worker's two sockets, driven by the test: it answers only what the test tells it to."""

    def __init__(self, client: WorkerClient, worker_id: str) -> None:
        self.worker_id = worker_id
        self.context = zmq.asyncio.Context()
        self.recv_from_router = self.context.socket(zmq.DEALER)
        self.recv_from_router.setsockopt(zmq.IDENTITY, worker_id.encode())
        self.recv_from_router.connect(client.to_worker_endpoint)
        self.send_to_router = self.context.socket(zmq.PUSH)
        self.send_to_router.connect(client.from_worker_endpoint)

    async def say_ready(self) -> None:
        await self.recv_from_router.send(protocol.encode(Ready(
            worker_id=self.worker_id, model="m", device="cpu", memory_bytes=1, dims={"dense": 2}, capabilities=[],
            engine="fake")))

    async def next_batch(self) -> EncodeBatch:
        message = protocol.decode_for_worker(await asyncio.wait_for(self.recv_from_router.recv(), 10))
        assert isinstance(message, EncodeBatch)
        return message

    async def send_frame(self, frame: bytes) -> None:
        await self.send_to_router.send_multipart([self.worker_id.encode(), frame])

    async def answer(self, batch: EncodeBatch) -> None:
        dense = Tensor.from_numpy(np.full((len(batch.items), 2), batch.batch_id, dtype=np.float32))
        await self.send_frame(protocol.encode(BatchDone(batch_id=batch.batch_id,
                                                        result=EncodeResult(token_counts=[1], dense=dense))))

    def close(self) -> None:
        self.recv_from_router.close(linger=0)
        self.send_to_router.close(linger=0)
        self.context.term()


def batch(batch_id: int) -> EncodeBatch:
    return EncodeBatch(batch_id=batch_id, items=[InputItem(text="x")], output_types=["dense"])


Scenario = Callable[[WorkerClient, list[tuple[str, str]]], Awaitable[None]]


def run(scenario: Scenario) -> list[tuple[str, str]]:
    """Run a scenario against a started client; returns the (worker id, why) of every worker it gave up on."""
    broken: list[tuple[str, str]] = []

    async def main() -> None:
        client = WorkerClient(on_broken=lambda worker_id, why: broken.append((worker_id, why)))
        client.start()
        try:
            await scenario(client, broken)
        finally:
            await client.close()

    asyncio.run(main())
    return broken


async def ready_worker(client: WorkerClient, worker_id: str) -> FakeWorker:
    handshake = client.expect(worker_id)
    worker = FakeWorker(client, worker_id)
    await worker.say_ready()
    assert isinstance(await asyncio.wait_for(handshake, 10), Ready)
    return worker


def test_a_call_gets_its_own_reply_and_one_counter_numbers_every_batch() -> None:
    async def scenario(client: WorkerClient, broken: list[tuple[str, str]]) -> None:
        a, b = await ready_worker(client, "a"), await ready_worker(client, "b")
        call_a = asyncio.create_task(client.call("a", batch, 10))
        call_b = asyncio.create_task(client.call("b", batch, 10))
        got_a, got_b = await a.next_batch(), await b.next_batch()
        assert got_a.batch_id != got_b.batch_id
        await b.answer(got_b)
        await a.answer(got_a)
        reply_a, reply_b = await call_a, await call_b
        assert isinstance(reply_a, BatchDone) and isinstance(reply_b, BatchDone)
        assert reply_a.batch_id == got_a.batch_id and reply_b.batch_id == got_b.batch_id
        assert not client.in_flight and not client.busy("a")
        a.close()
        b.close()

    assert run(scenario) == []


def test_an_undecodable_frame_is_dropped_and_both_loops_keep_serving() -> None:
    async def scenario(client: WorkerClient, broken: list[tuple[str, str]]) -> None:
        a = await ready_worker(client, "a")
        await a.send_frame(GARBAGE)  # on the reply socket
        await a.recv_from_router.send(GARBAGE)  # and on the handshake socket
        call = asyncio.create_task(client.call("a", batch, 10))
        await a.answer(await a.next_batch())
        assert isinstance(await call, BatchDone)
        b = await ready_worker(client, "b")  # the handshake loop still runs
        call = asyncio.create_task(client.call("b", batch, 10))
        await b.answer(await b.next_batch())
        assert isinstance(await call, BatchDone)
        a.close()
        b.close()

    assert run(scenario) == []


def test_a_worker_that_keeps_sending_garbage_is_given_up_on() -> None:
    async def scenario(client: WorkerClient, broken: list[tuple[str, str]]) -> None:
        a = await ready_worker(client, "a")
        call = asyncio.create_task(client.call("a", batch, 10))
        await a.next_batch()
        for _ in range(3):
            await a.send_frame(GARBAGE)
        with pytest.raises(WorkerLost, match="undecodable"):
            await asyncio.wait_for(call, 10)
        a.close()

    broken = run(scenario)
    assert [worker_id for worker_id, _ in broken] == ["a"]


def test_a_reply_with_a_code_this_router_does_not_know_fails_that_batch_as_internal_error() -> None:
    async def scenario(client: WorkerClient, broken: list[tuple[str, str]]) -> None:
        a = await ready_worker(client, "a")
        call = asyncio.create_task(client.call("a", batch, 10))
        got = await a.next_batch()
        await a.send_frame(protocol.encode(BatchFailed(batch_id=got.batch_id, code="FROM_THE_FUTURE",  # type: ignore[arg-type]
                                                       message="x")))
        reply = await asyncio.wait_for(call, 10)
        assert isinstance(reply, BatchFailed) and reply.code is ErrorCode.INTERNAL_ERROR
        assert "FROM_THE_FUTURE" in reply.message
        a.close()

    assert run(scenario) == []


def test_a_handshake_this_router_cannot_read_fails_that_load_at_once() -> None:
    async def scenario(client: WorkerClient, broken: list[tuple[str, str]]) -> None:
        handshake = client.expect("a")
        a = FakeWorker(client, "a")
        await a.recv_from_router.send(protocol.encode(LoadFailed(
            worker_id="a", code=ErrorCode.MODEL_LOAD_FAILED, error_class="NEWFANGLED", message="m")))  # type: ignore[arg-type]
        with pytest.raises(WorkerLost, match="cannot read"):
            await asyncio.wait_for(handshake, 10)
        a.close()

    assert run(scenario) == []


def test_a_hung_worker_fails_its_calls_at_the_deadline_and_is_reported() -> None:
    async def scenario(client: WorkerClient, broken: list[tuple[str, str]]) -> None:
        a, b = await ready_worker(client, "a"), await ready_worker(client, "b")
        started = time.monotonic()
        first = asyncio.create_task(client.call("a", batch, 0.5))
        second = asyncio.create_task(client.call("a", batch, 0.5))  # queued behind the one that hangs
        await a.next_batch()  # and never answered
        for call in (first, second):
            with pytest.raises(WorkerLost, match="no progress"):
                await asyncio.wait_for(call, 10)
        assert 0.5 <= time.monotonic() - started < 8
        call = asyncio.create_task(client.call("b", batch, 10))  # another worker is untouched
        await b.answer(await b.next_batch())
        assert isinstance(await call, BatchDone)
        a.close()
        b.close()

    broken = run(scenario)
    assert [worker_id for worker_id, _ in broken] == ["a"]


def test_a_batch_queued_behind_a_slow_one_is_timed_from_the_worker_s_last_progress() -> None:
    async def scenario(client: WorkerClient, broken: list[tuple[str, str]]) -> None:
        a = await ready_worker(client, "a")
        first = asyncio.create_task(client.call("a", batch, 60))
        second = asyncio.create_task(client.call("a", batch, 60))
        await a.answer(await a.next_batch())
        assert isinstance(await first, BatchDone)
        [waiting] = client.in_flight.values()
        progress = client.progress["a"]
        assert progress > waiting.sent_at
        # Measured from its send, the second batch would be overdue at sent_at + 61; the worker only just got to it.
        assert client.overdue(waiting.sent_at + 60 + (progress - waiting.sent_at) / 2) == []
        assert [w for w, _ in client.overdue(progress + 61)] == ["a"]
        await a.answer(await a.next_batch())
        assert isinstance(await second, BatchDone)
        a.close()

    assert run(scenario) == []


def test_calling_a_worker_that_is_not_connected_raises_at_once() -> None:
    async def scenario(client: WorkerClient, broken: list[tuple[str, str]]) -> None:
        with pytest.raises(WorkerLost, match="unreachable"):
            await client.call("nobody", batch, 10)
        assert not client.in_flight

    assert run(scenario) == []


def test_forget_fails_the_handshake_and_the_calls_of_a_gone_worker() -> None:
    async def scenario(client: WorkerClient, broken: list[tuple[str, str]]) -> None:
        a = await ready_worker(client, "a")
        call = asyncio.create_task(client.call("a", batch, 10))
        await a.next_batch()
        loading = client.expect("b")
        client.forget("a", WorkerLost("a exited"))
        client.forget("b", WorkerLost("b exited"))
        with pytest.raises(WorkerLost, match="a exited"):
            await call
        with pytest.raises(WorkerLost, match="b exited"):
            await loading
        a.close()

    assert run(scenario) == []


class _Injected(BaseException):
    """Escapes each loop's own guard (which catches Exception), as only a bug in the guard itself could."""


def test_the_deadline_loop_is_restarted_when_it_dies() -> None:
    async def scenario(client: WorkerClient, broken: list[tuple[str, str]]) -> None:
        a = await ready_worker(client, "a")
        real, failures = client.overdue, []

        def flaky(now: float) -> list[tuple[str, str]]:
            if not failures:
                failures.append(1)
                raise _Injected
            return real(now)

        client.overdue = flaky  # type: ignore[method-assign]
        deadlines = next(loop for loop in client.loops if loop.name == "sie-deadlines")
        call = asyncio.create_task(client.call("a", batch, 0.3))
        await a.next_batch()  # never answered: only a restarted deadline loop can fail the call
        with pytest.raises(WorkerLost, match="no progress"):
            await asyncio.wait_for(call, 10)
        assert failures == [1] and deadlines.restarts == 1
        a.close()

    assert [worker_id for worker_id, _ in run(scenario)] == ["a"]
