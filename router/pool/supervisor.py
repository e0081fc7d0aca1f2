"""The worker supervisor (router process): spawn, handshake, sentinel, hang kill, restart back-off and stop.

Workers start as `python -m sie_worker` with their spec on stdin, so the router imports only the protocol from the
worker package. A worker is found dead by its process sentinel (a pidfd), frozen by a ping it leaves unanswered (the
worker client pings every ready worker), and hung by a batch deadline: the deadline is many times the model's fitted
busy time for a batch of that cost (its pace, which the model's queue learns), at least a floor, at most
`batch_timeout_s` (unless a healthy batch that costly takes longer than a third of it). A frozen or hung worker is
SIGKILLed and then handled exactly like one that crashed: its calls fail retryably and the model's next worker waits
out a back-off (`restarts.py`). A clean stop sends `Shutdown` and waits for the exit before any signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec

from sie_router import metrics
from sie_router.errors import LoadError
from sie_router.pool.ipc import Handshake, Reply, WorkerClient, WorkerLost
from sie_router.pool.pacing import BusyTimeFit
from sie_router.pool.restarts import Restarts
from sie_router.settings import Settings
from sie_worker.protocol import (
    LoadErrorClass,
    LoadFailed,
    Message,
    Ready,
    Shutdown,
    WorkerSpec,
)

log = logging.getLogger("sie.supervisor")

# A batch may take this many times the worker's fitted busy time for its size before the worker counts as hung.
HUNG_FACTOR = 20.0
# ... and never less than this many times, whatever the cap: a cap below a healthy batch's time would kill healthy
# workers again and again, each restart after a longer back-off, which is worse than finding a hang late.
MIN_FACTOR = 3.0
# A worker told to stop (`Shutdown`) gets at least this long to exit by itself, whatever is left of the deadline ...
STOP_MIN_S = 3.0
# ... then SIGTERM, and SIGKILL after this long.
TERM_GRACE_S = 2.0


class WorkerProcess:
    """A worker's OS process and a pidfd that becomes readable when it exits (the sentinel)."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid
        try:
            self.sentinel = os.pidfd_open(popen.pid)
        except OSError:
            popen.kill()  # unwatchable: never leave it running
            popen.wait()
            raise

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.terminate()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()

    def join(self, timeout: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.sentinel)


def spawn_worker(spec: WorkerSpec) -> WorkerProcess:
    """Start `python -m sie_worker`; the spec travels as msgpack on stdin (it never shows in `ps`)."""
    popen = subprocess.Popen([sys.executable, "-m", "sie_worker"], stdin=subprocess.PIPE)
    assert popen.stdin is not None
    popen.stdin.write(msgspec.msgpack.encode(spec))
    popen.stdin.close()
    return WorkerProcess(popen)


def stop_processes(processes: list[WorkerProcess], deadline_s: float) -> None:
    """SIGTERM every live process, join them all to one shared deadline, then SIGKILL the rest."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + deadline_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(5)


@dataclass
class Worker:
    """One worker process and what the router knows about it."""

    worker_id: str
    key: str
    process: WorkerProcess
    device: str
    info: Ready | None = None
    started_at: float = field(default_factory=time.time)
    ready_at: float = 0.0  # monotonic time of its Ready
    batches_served: int = 0
    items_served: int = 0
    stopping: bool = False  # evicted or shut down: its exit is not a crash
    backoff_s: float | None = None  # set when it crashed: the back-off before the model's next worker
    exited: asyncio.Event = field(default_factory=asyncio.Event)


def batch_deadline(pace: BusyTimeFit, cost: int, floor_s: float, cap_s: float) -> float:
    """Seconds a batch of this cost may take: HUNG_FACTOR times its expected busy time, at least `floor_s`, at most
    `cap_s` unless that is under MIN_FACTOR times the expected time; `cap_s` while the worker's pace is unknown."""
    expected = pace.predict(cost)
    if expected is None:
        return cap_s
    return max(MIN_FACTOR * expected, min(cap_s, max(floor_s, HUNG_FACTOR * expected)))


class Supervisor:
    """Owns every worker process. `on_exit(worker, exitcode)` is told when one exits, after its calls failed."""

    def __init__(self, settings: Settings, on_exit: Callable[[Worker, int | None], None]) -> None:
        self.settings = settings
        self.on_exit = on_exit
        self.client = WorkerClient(on_broken=self._kill_broken, ping_interval_s=settings.ping_interval_s,
                                   ping_timeout_s=settings.ping_timeout_s)
        self.workers: dict[str, Worker] = {}
        self.restarts = Restarts(settings)
        self._draining: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self.client.start()

    # -- starting ---------------------------------------------------------------------------------------------------

    async def spawn(self, spec: WorkerSpec, key: str,
                    on_export: Callable[[], Awaitable[None]] | None = None) -> Worker:
        """Start a worker and wait for its `Ready`; raises `LoadError` if it fails, dies or times out first. If the
        worker says it starts a graph export first, `on_export()` runs (placement reserves the helper's memory); what
        it raises stops the worker and fails the load."""
        try:
            process = spawn_worker(spec)
        except OSError as exc:  # EMFILE, ENOMEM, EAGAIN: the system refuses for now; a later try may succeed
            raise LoadError(LoadErrorClass.STORAGE, f"cannot start a worker for '{key}': {exc}") from None
        handshake = self.client.expect(spec.worker_id)
        export = self.client.expect_export(spec.worker_id)
        worker = Worker(worker_id=spec.worker_id, key=key, process=process, device=spec.device)
        self.workers[worker.worker_id] = worker
        asyncio.get_running_loop().add_reader(worker.process.sentinel, self._on_sentinel, worker)
        try:
            message = await asyncio.wait_for(self._handshake(worker, handshake, export, on_export),
                                             self.settings.load_timeout_s)
        except TimeoutError:
            # SIGKILL at the deadline: a frozen load never acts on SIGTERM, and a slow one has nothing to save. Its
            # graph-export helper, if any, dies with it (the helper asks the kernel for that).
            worker.stopping = True
            worker.process.kill()
            raise LoadError(LoadErrorClass.TIMEOUT, f"model '{key}' did not load within "
                            f"{self.settings.load_timeout_s:g}s; its worker was killed") from None
        except WorkerLost as exc:
            raise LoadError(LoadErrorClass.ENGINE, f"model '{key}' failed to load: {exc}") from None
        if isinstance(message, LoadFailed):
            worker.stopping = True  # it exits by itself after saying so; that is no crash
            raise LoadError(message.error_class, f"model '{key}' failed to load: {message.message}")
        worker.info, worker.ready_at = message, time.monotonic()
        return worker

    async def _handshake(self, worker: Worker, handshake: asyncio.Future[Handshake], export: asyncio.Future[None],
                         on_export: Callable[[], Awaitable[None]] | None) -> Handshake:
        """The worker's `Ready` or `LoadFailed`, after `on_export()` if the worker announced an export before it.

        The worker sends `ExportStarting` before `Ready`, so a Ready that came in the same instant (a fast export, a
        busy router) still follows the export: placement sees it either way, and the same budget gives the same answer
        whatever the timing."""
        try:
            await asyncio.wait([handshake, export], return_when=asyncio.FIRST_COMPLETED)
            failed = handshake.done() and (handshake.cancelled() or handshake.exception() is not None
                                           or isinstance(handshake.result(), LoadFailed))
            if export.done() and not export.cancelled() and not failed and on_export is not None:
                try:
                    await on_export()
                except BaseException:
                    # SIGKILL: a loading worker reads no Shutdown; its export helper dies with it.
                    worker.stopping = True
                    worker.process.kill()
                    raise
            return await handshake
        finally:
            self.client.exports.pop(worker.worker_id, None)
            export.cancel()

    # -- calls ------------------------------------------------------------------------------------------------------

    async def call(self, worker: Worker, make: Callable[[int], Message], pace: BusyTimeFit, cost: int) -> Reply:
        """Run one batch on the worker; raises `WorkerLost` when the worker dies or hangs. The deadline comes from the
        model's pace (`pace`, learned by its batcher from the worker's own timing) for a batch of this cost."""
        deadline = batch_deadline(pace, cost, self.settings.batch_timeout_floor_s, self.settings.batch_timeout_s)
        return await self.client.call(worker.worker_id, make, deadline)

    def busy(self, worker: Worker) -> bool:
        return self.client.busy(worker.worker_id)

    @property
    def worker_endpoints(self) -> tuple[str, str]:
        """The two router sockets a new worker connects to: (to the worker, from the worker)."""
        return self.client.to_worker_endpoint, self.client.from_worker_endpoint

    @property
    def calls_in_flight(self) -> int:
        """Batches sent to any worker and not yet answered."""
        return self.client.calls_in_flight

    # -- exits, hangs and restarts ----------------------------------------------------------------------------------

    def _kill_broken(self, worker_id: str, why: str) -> None:
        worker = self.workers.get(worker_id)
        if worker is None:
            return
        log.error("killing the worker for %s (pid %d): it %s", worker.key, worker.process.pid, why)
        metrics.WORKER_HANGS.labels(worker.key).inc()
        worker.process.kill()  # SIGKILL: a hung process may never act on SIGTERM; the sentinel does the rest

    def _on_sentinel(self, worker: Worker) -> None:
        """The worker exited: fail what it held, start the model's back-off unless it was told to stop, tell the
        pool."""
        asyncio.get_running_loop().remove_reader(worker.process.sentinel)
        worker.process.join(1.0)
        worker.process.close()
        code = worker.process.exitcode
        self.workers.pop(worker.worker_id, None)
        # An exit while loading is that load's failure (`spawn` raises it); a crash is the exit of a ready worker.
        if not worker.stopping and worker.info is not None:
            served = time.monotonic() - worker.ready_at
            worker.backoff_s = self.restarts.crashed(worker.key, served)
            metrics.WORKER_RESTARTS.labels(worker.key).inc()
            log.warning("worker for %s (pid %s) exited with status %s after %.0fs ready; its next worker starts in "
                        "%.1fs (%d crashes in a row)", worker.key, worker.process.pid, code, served, worker.backoff_s,
                        self.restarts.of(worker.key).in_a_row)
        lost = WorkerLost(f"the worker for '{worker.key}' stopped (exit status {code})")
        if code is not None and code >= 0 and self.client.busy(worker.worker_id):
            # It exited by itself, and may have flushed the answer to its last batch just before (a broken CUDA
            # context answers its batch, then exits): read that before failing what is left.
            drain = asyncio.create_task(self.client.forget_after_replies(worker.worker_id, lost),
                                        name=f"sie-drain:{worker.worker_id}")
            self._draining.add(drain)
            drain.add_done_callback(self._draining.discard)
        else:
            self.client.forget(worker.worker_id, lost)
        worker.exited.set()
        self.on_exit(worker, code)

    # -- stopping ---------------------------------------------------------------------------------------------------

    async def stop(self, workers: list[Worker], deadline_s: float) -> None:
        """Send each worker `Shutdown` and wait for it to exit (at least STOP_MIN_S, else until the deadline); only
        then SIGTERM what is left, and SIGKILL it TERM_GRACE_S later. A worker still loading reads no `Shutdown`
        until its load ends: it goes straight to the signals."""
        for worker in workers:
            worker.stopping = True
            self.client.retire(worker.worker_id)
            if worker.info is not None and worker.process.is_alive():
                with contextlib.suppress(WorkerLost, TimeoutError):  # gone, or its queue is full: the signals follow
                    await asyncio.wait_for(self.client.send(worker.worker_id, Shutdown()), 1.0)
        told = [w for w in workers if w.info is not None and w.process.is_alive() and not w.exited.is_set()]
        if told:
            waits = [asyncio.create_task(w.exited.wait()) for w in told]
            _, pending = await asyncio.wait(waits, timeout=max(STOP_MIN_S, deadline_s))
            for wait in pending:
                wait.cancel()
        late = [w for w in workers if w.process.is_alive()]
        for worker in late:
            if worker.info is not None:
                log.warning("the worker for %s (pid %d) did not exit after Shutdown; terminating it", worker.key,
                            worker.process.pid)
        if late:
            await asyncio.to_thread(stop_processes, [w.process for w in late], TERM_GRACE_S)

    async def close(self) -> None:
        for drain in list(self._draining):
            await drain
        await self.client.close()
