"""The worker client (router process): both ZeroMQ sockets, their receive loops, and every call in flight.

`send_to_workers` is a ROUTER: batches go to one worker by identity, and each worker's `Ready` or `LoadFailed`
arrives on it (the handshake on the same socket proves the route exists). `recv_from_workers` is a PULL that gathers
every worker's replies, each as two frames: the worker's id, then the message. The endpoints are `ipc://` files in a
private 0700 folder: only this user reaches them.

Every call has a deadline, counted from when the worker could start on it (its previous reply, or the send if it was
idle): a worker that lets a batch outlive it is hung. Every ready worker is also pinged (`Ping`, answered `Alive` on
the DEALER by the thread that receives its batches, busy or idle): one that lets a ping go unanswered past its
deadline is frozen, and treated as hung before a request waits on it. Neither receive loop dies on a bad frame: it is
logged with the worker's id and dropped, and a worker that keeps sending them is treated as hung.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import shutil
import tempfile
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

from sie_router.loops import Loop
from sie_sdk.codes import ErrorCode
from sie_worker import protocol
from sie_worker.protocol import Alive, BatchDone, BatchFailed, ExportStarting, LoadFailed, Ping, Ready

log = logging.getLogger("sie.ipc")

WATCH_S = 0.1  # how often deadlines are checked
GARBAGE_LIMIT = 3  # undecodable frames from one worker within GARBAGE_WINDOW_S that make it count as broken
GARBAGE_WINDOW_S = 60.0
# A worker that exited by itself may have flushed replies just before: they are read, for this long at most, before
# its calls still open fail (a broken CUDA context answers its batch, then exits).
REPLY_GRACE_S = 0.25

Reply = BatchDone | BatchFailed
Handshake = Ready | LoadFailed


class WorkerLost(Exception):
    """The worker will not answer: it is gone, it let a call outlive its deadline, or it keeps sending garbage."""


@dataclass(eq=False)
class Call:
    """One batch sent to a worker and not yet answered."""

    worker_id: str
    future: asyncio.Future[Reply]
    deadline_s: float
    sent_at: float


class WorkerClient:
    """Talks to every worker. `on_broken(worker_id, why)` is told of a hung, frozen or garbling worker, after its calls
    fail. A ready worker is pinged once `ping_interval_s` passed since it last answered (0: never), and is frozen when
    a ping goes unanswered for `ping_timeout_s`."""

    def __init__(self, on_broken: Callable[[str, str], None], ping_interval_s: float = 0.0,
                 ping_timeout_s: float = 5.0) -> None:
        self.on_broken = on_broken
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.folder = Path(tempfile.mkdtemp(prefix="sie-ipc-"))  # mkdtemp creates it 0700
        self.context = zmq.asyncio.Context()
        self.send_to_workers = self.context.socket(zmq.ROUTER)
        self.send_to_workers.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a gone worker raises instead of dropping
        self.send_to_workers.setsockopt(zmq.LINGER, 0)
        self.to_worker_endpoint = f"ipc://{self.folder}/to-workers"
        self.send_to_workers.bind(self.to_worker_endpoint)
        self.recv_from_workers = self.context.socket(zmq.PULL)
        self.recv_from_workers.setsockopt(zmq.LINGER, 0)
        self.from_worker_endpoint = f"ipc://{self.folder}/from-workers"
        self.recv_from_workers.bind(self.from_worker_endpoint)
        self.in_flight: dict[int, Call] = {}
        self.batch_ids = itertools.count(1)
        self.handshakes: dict[str, asyncio.Future[Handshake]] = {}
        self.exports: dict[str, asyncio.Future[None]] = {}  # loading worker id -> resolved by its `ExportStarting`
        self.progress: dict[str, float] = {}  # worker id -> when it last answered, or was given work while idle
        self.garbage: defaultdict[str, deque[float]] = defaultdict(deque)
        self.answered: dict[str, float] = {}  # ready worker id -> when it said Ready or last answered a ping
        self.pinged: dict[str, float] = {}  # worker id -> when its unanswered ping was sent
        # Each loop also survives anything one message can do by itself; the supervision is for the rest.
        self.loops = [Loop(self._receive_handshakes, "sie-handshakes", "worker handshakes and pings"),
                      Loop(self._receive_replies, "sie-replies", "worker replies"),
                      Loop(self._watch_deadlines, "sie-deadlines", "call deadlines and pings")]

    def start(self) -> None:
        for loop in self.loops:
            loop.start()

    # -- calls ------------------------------------------------------------------------------------------------------

    def expect(self, worker_id: str) -> asyncio.Future[Handshake]:
        """The future the worker's `Ready` or `LoadFailed` will resolve."""
        future: asyncio.Future[Handshake] = asyncio.get_running_loop().create_future()
        self.handshakes[worker_id] = future
        return future

    def expect_export(self, worker_id: str) -> asyncio.Future[None]:
        """The future a loading worker's `ExportStarting` will resolve (it may never come: the graph was cached)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.exports[worker_id] = future
        return future

    async def call(self, worker_id: str, make: Callable[[int], protocol.Message], deadline_s: float) -> Reply:
        """Send `make(batch_id)` and return the reply; raises `WorkerLost` if none comes within the deadline."""
        batch_id = next(self.batch_ids)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        now = time.monotonic()
        if not self.busy(worker_id):
            self.progress[worker_id] = now  # an idle worker's clock starts with this batch
        self.in_flight[batch_id] = Call(worker_id, future, deadline_s, now)
        try:
            try:  # the send can wait too (a worker that stopped reading fills its queue): it shares the deadline
                await asyncio.wait_for(self.send(worker_id, make(batch_id)), deadline_s)
            except TimeoutError:
                raise WorkerLost(f"worker {worker_id} took no batch for {deadline_s:.1f}s") from None
            return await future
        finally:
            self.in_flight.pop(batch_id, None)

    async def send(self, worker_id: str, message: protocol.Message) -> None:
        try:
            await self.send_to_workers.send_multipart([worker_id.encode(), protocol.encode(message)], copy=False)
        except zmq.ZMQError as exc:
            raise WorkerLost(f"worker {worker_id} is unreachable: {exc}") from exc

    def busy(self, worker_id: str) -> bool:
        return any(call.worker_id == worker_id for call in self.in_flight.values())

    @property
    def calls_in_flight(self) -> int:
        return len(self.in_flight)

    def retire(self, worker_id: str) -> None:
        """The worker is being told to stop: it answers no more pings, and must not be found frozen for that."""
        self.answered.pop(worker_id, None)
        self.pinged.pop(worker_id, None)

    def forget(self, worker_id: str, error: Exception) -> None:
        """The worker is gone: fail its handshake and its calls with `error`."""
        handshake = self.handshakes.pop(worker_id, None)
        if handshake is not None and not handshake.done():
            handshake.set_exception(error)
        export = self.exports.pop(worker_id, None)
        if export is not None:
            export.cancel()
        for call in [c for c in self.in_flight.values() if c.worker_id == worker_id]:
            if not call.future.done():
                call.future.set_exception(error)
        self.progress.pop(worker_id, None)
        self.garbage.pop(worker_id, None)
        self.retire(worker_id)

    async def forget_after_replies(self, worker_id: str, error: Exception) -> None:
        """`forget`, once the replies a worker that exited by itself flushed before its exit have been read (they
        travel on another socket than the one its exit is seen on), or after REPLY_GRACE_S."""
        self.retire(worker_id)
        deadline = time.monotonic() + REPLY_GRACE_S
        while self.busy(worker_id) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self.forget(worker_id, error)

    # -- receive loops ----------------------------------------------------------------------------------------------

    async def _receive_handshakes(self) -> None:
        while True:
            try:
                identity, frame = await self.send_to_workers.recv_multipart(copy=False)
                self._on_handshake(identity.bytes.decode(errors="replace"), frame.buffer)
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must outlive anything one message can do
                log.exception("dropping a handshake frame that could not be handled")

    def _on_handshake(self, worker_id: str, frame: memoryview) -> None:
        try:
            message = protocol.decode_for_router(frame)
        except msgspec.ValidationError as exc:  # well-formed, not ours (an error class this router does not know)
            future = self.handshakes.pop(worker_id, None)
            if future is not None and not future.done():
                future.set_exception(WorkerLost(f"worker {worker_id} sent a handshake this server cannot read: {exc}"))
            return
        except msgspec.DecodeError as exc:
            self._bad_frame(worker_id, exc)
            return
        if isinstance(message, Alive):
            if worker_id in self.answered:  # not when it was retired meanwhile
                self.answered[worker_id] = time.monotonic()
            self.pinged.pop(worker_id, None)
            return
        if isinstance(message, ExportStarting):
            export = self.exports.pop(worker_id, None)
            if export is not None and not export.done():
                export.set_result(None)
            return
        future = self.handshakes.pop(worker_id, None)
        if not isinstance(message, (Ready, LoadFailed)) or future is None or future.done():
            log.warning("ignoring an unexpected %s from worker %s", type(message).__name__, worker_id)
            return
        if isinstance(message, Ready):
            self.answered[worker_id] = time.monotonic()
        future.set_result(message)

    async def _receive_replies(self) -> None:
        while True:
            try:
                frames = await self.recv_from_workers.recv_multipart(copy=False)
                if len(frames) != 2:
                    log.error("dropping a reply of %d frames (expected worker id and message)", len(frames))
                    continue
                self._on_reply(frames[0].bytes.decode(errors="replace"), frames[1].buffer)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("dropping a reply frame that could not be handled")

    def _on_reply(self, worker_id: str, frame: memoryview) -> None:
        try:
            message = protocol.decode_for_router(frame)
        except msgspec.ValidationError as exc:
            # Well-formed but not ours (a code this router does not know): fail that batch now, coded.
            batch_id = protocol.batch_id_of(frame)
            call = self.in_flight.get(batch_id) if batch_id is not None else None
            if call is None or call.worker_id != worker_id:
                self._bad_frame(worker_id, exc)
                return
            log.error("worker %s answered batch %d with a reply this router cannot read: %s", worker_id, batch_id, exc)
            message = BatchFailed(batch_id=batch_id, code=ErrorCode.INTERNAL_ERROR,
                                  message=f"the worker answered with a reply this server cannot read ({exc})")
        except msgspec.DecodeError as exc:
            self._bad_frame(worker_id, exc)
            return
        if not isinstance(message, (BatchDone, BatchFailed)):
            log.warning("ignoring an unexpected %s from worker %s", type(message).__name__, worker_id)
            return
        call = self.in_flight.get(message.batch_id)
        if call is None or call.worker_id != worker_id:
            return  # its caller gave up (the worker was declared lost), or a stray: nobody waits for it
        self.progress[worker_id] = time.monotonic()
        if not call.future.done():
            call.future.set_result(message)

    def _bad_frame(self, worker_id: str, exc: Exception) -> None:
        log.error("dropping an undecodable frame from worker %s: %s", worker_id, exc)
        now = time.monotonic()
        seen = self.garbage[worker_id]
        seen.append(now)
        while seen and now - seen[0] > GARBAGE_WINDOW_S:
            seen.popleft()
        if len(seen) >= GARBAGE_LIMIT:
            self._give_up(worker_id, f"sent {len(seen)} undecodable frames within {GARBAGE_WINDOW_S:g}s")

    # -- deadlines --------------------------------------------------------------------------------------------------

    async def _watch_deadlines(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                now = time.monotonic()
                for worker_id, why in self.overdue(now):
                    self._give_up(worker_id, why)
                if self.ping_interval_s > 0:
                    await self._ping(now)
            except Exception:
                log.exception("checking call deadlines failed")

    async def _ping(self, now: float) -> None:
        """Ping each ready worker whose last answer is older than the interval and that has no ping pending."""
        due = [w for w, at in self.answered.items() if w not in self.pinged and now - at >= self.ping_interval_s]
        for worker_id in due:
            self.pinged[worker_id] = now
            # A frozen worker's queue takes the ping (up to its high-water mark); the wait only bounds a full one.
            with contextlib.suppress(WorkerLost, TimeoutError):
                await asyncio.wait_for(self.send(worker_id, Ping()), WATCH_S)

    def overdue(self, now: float) -> list[tuple[str, str]]:
        """Workers whose oldest call has outlived its deadline, or whose ping went unanswered past its deadline. A
        worker runs its batches in order, so a call's clock starts at the worker's last sign of progress: a batch
        queued behind a slow one is not blamed for its wait."""
        oldest: dict[str, Call] = {}
        for call in self.in_flight.values():  # in batch id order, so the first seen is the oldest
            oldest.setdefault(call.worker_id, call)
        found = []
        for worker_id, call in oldest.items():
            started = max(call.sent_at, self.progress.get(worker_id, call.sent_at))
            if now - started > call.deadline_s:
                found.append((worker_id, f"made no progress for {now - started:.1f}s on a batch whose deadline is "
                                         f"{call.deadline_s:.1f}s"))
        for worker_id, sent in self.pinged.items():
            if now - sent > self.ping_timeout_s and worker_id not in {w for w, _ in found}:
                found.append((worker_id, f"did not answer a ping for {now - sent:.1f}s (frozen?)"))
        return found

    def _give_up(self, worker_id: str, why: str) -> None:
        log.error("worker %s is broken: it %s", worker_id, why)
        self.forget(worker_id, WorkerLost(f"the worker {why}"))
        self.on_broken(worker_id, why)

    async def close(self) -> None:
        for loop in self.loops:
            await loop.stop()
        self.send_to_workers.close(linger=0)
        self.recv_from_workers.close(linger=0)
        self.context.term()
        shutil.rmtree(self.folder, ignore_errors=True)
