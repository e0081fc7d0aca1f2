"""WorkerPool (router process): one supervised worker process per loaded model.

It starts workers on demand, completes their `Ready` handshake, routes batches and results by `batch_id`, and notices
a dead worker through its process sentinel: the worker's in-flight batches fail retryably and the next request
restarts it. States a model moves through: available -> loading -> loaded (-> available again when its worker stops),
or failed with `last_error`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any

from sie_router.errors import SIEError
from sie_router.ipc import Channel, WorkerUnreachable
from sie_router.processes import spawn_worker, stop_processes
from sie_router.registry import ModelConfig, Registry
from sie_router.settings import Settings
from sie_router.weights import WeightsNotFound, WeightsQuery, resolve_weights
from sie_worker.protocol import (
    BatchDone,
    BatchFailed,
    EncodeBatch,
    ExtractBatch,
    LoadFailed,
    Ready,
    Result,
    ScoreBatch,
    Shutdown,
    WorkerSpec,
)

log = logging.getLogger("sie.pool")

Batch = EncodeBatch | ScoreBatch | ExtractBatch
# After a transient load failure, requests get the failure (502, no retry) for this long before a new attempt.
LOAD_RETRY_COOLDOWN_S = 30.0


@dataclass
class Worker:
    """One worker process and what the router knows about it."""

    worker_id: str
    key: str
    process: BaseProcess
    device: str
    ready: asyncio.Future[Ready]
    info: Ready | None = None
    in_flight: dict[int, asyncio.Future[BatchDone]] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    batches_served: int = 0


@dataclass
class Slot:
    """A model as the pool sees it: its config, its worker if any, and its load state."""

    key: str
    config: ModelConfig
    state: str = "available"
    worker: Worker | None = None
    loading: asyncio.Task[Worker] | None = None
    last_error: dict[str, Any] | None = None
    load_started: float = 0.0
    failed_at: float = 0.0


class WorkerPool:
    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.channel = Channel()
        self.slots = {cfg.sie_id: Slot(key=cfg.sie_id, config=cfg) for cfg in registry.configs.values()}
        self.workers: dict[str, Worker] = {}
        self.batch_ids = itertools.count(1)
        self.accepting = True
        self.started_at = time.time()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._receive_handshakes(), name="sie-handshakes"),
                       asyncio.create_task(self._receive_results(), name="sie-results")]

    def slot(self, model: str) -> Slot:
        config, _ = self.registry.lookup(model)
        return self.slots[config.sie_id]

    # -- loading ----------------------------------------------------------------------------------------------------

    async def ensure(self, model: str, wait_s: float | None) -> Worker:
        """The model's ready worker; starts a load if needed. With `wait_s` None, a cold model raises at once."""
        slot = self.slot(model)
        if slot.worker is not None and slot.worker.info is not None:
            return slot.worker
        if not self.accepting:
            raise SIEError("SHUTTING_DOWN", "the server is shutting down")
        if slot.state == "failed" and slot.last_error and slot.loading is None:
            permanent = bool(slot.last_error.get("permanent"))
            if permanent or time.monotonic() - slot.failed_at < LOAD_RETRY_COOLDOWN_S:
                raise SIEError("MODEL_LOAD_FAILED", slot.last_error["message"],
                               error_class=slot.last_error["code"], permanent=permanent,
                               attempts=slot.last_error["attempts"])
        if slot.loading is None:
            slot.loading = asyncio.create_task(self._load(slot), name=f"sie-load:{slot.key}")
        if wait_s is None or wait_s <= 0:
            if slot.loading.done() and not slot.loading.cancelled() and slot.loading.exception() is None:
                return slot.loading.result()
            raise SIEError("MODEL_LOADING", f"model '{model}' is loading; retry shortly")
        try:
            return await asyncio.wait_for(asyncio.shield(slot.loading), wait_s)
        except TimeoutError:
            raise SIEError("MODEL_LOADING", f"model '{model}' is still loading after {wait_s:g}s") from None

    async def _load(self, slot: Slot) -> Worker:
        slot.state, slot.load_started = "loading", time.monotonic()
        try:
            worker = await self._start_worker(slot)
        except SIEError as exc:
            slot.state, slot.failed_at = "failed", time.monotonic()
            slot.last_error = {"code": exc.extra.get("error_class", "UNKNOWN"), "message": exc.message,
                               "attempts": 1, "permanent": exc.extra.get("permanent", True)}
            raise
        finally:
            slot.loading = None
        slot.state, slot.worker, slot.last_error = "loaded", worker, None
        info = worker.info
        assert info is not None
        log.info("model %s ready on %s in %.1fs (pid %d, %.0f MiB)", slot.key, worker.device,
                 time.monotonic() - slot.load_started, info.pid, info.memory_bytes / 2**20)
        return worker

    async def _start_worker(self, slot: Slot) -> Worker:
        cfg = slot.config
        query = WeightsQuery(model_id=cfg.sie_id, hf_id=cfg.hf_id, weights_path=cfg.weights_path,
                             package_dir=cfg.package_dir, revision=cfg.hf_revision)
        try:
            folder, origin = (("", "none") if cfg.package_backed else
                              await asyncio.to_thread(resolve_weights, query, offline=self.settings.hf_offline))
        except WeightsNotFound as exc:
            log.error("cannot load %s: %s", cfg.sie_id, exc)
            raise SIEError("MODEL_LOAD_FAILED", str(exc), error_class="NOT_FOUND", permanent=True) from None
        device, env = self._place(cfg)
        profile = cfg.profiles["default"]
        spec = WorkerSpec(
            worker_id=f"{uuid.uuid4().hex[:12]}", model=cfg.sie_id, adapter=cfg.family(), weights_dir=str(folder),
            to_worker_endpoint=self.channel.to_worker_endpoint,
            from_worker_endpoint=self.channel.from_worker_endpoint, device=device,
            compute_precision=profile.compute_precision, max_sequence_length=cfg.max_sequence_length,
            loadtime=profile.adapter_options.loadtime, runtime=profile.adapter_options.runtime,
            threads=self.settings.worker_threads or (os.cpu_count() or 1),
            env={**self.settings.extra_env, **env}, max_batch_tokens=profile.max_batch_tokens or 16384)
        log.info("loading %s: %s adapter, weights from %s (%s), on %s", cfg.sie_id, spec.adapter, folder or "-",
                 origin, device)
        loop = asyncio.get_running_loop()
        worker = Worker(worker_id=spec.worker_id, key=slot.key, process=spawn_worker(spec), device=device,
                        ready=loop.create_future())
        self.workers[worker.worker_id] = worker
        loop.add_reader(worker.process.sentinel, self._on_exit, worker)
        try:
            worker.info = await asyncio.wait_for(asyncio.shield(worker.ready), self.settings.load_timeout_s)
        except TimeoutError:
            self._stop_worker(worker)
            raise SIEError("MODEL_LOAD_FAILED", f"model '{cfg.sie_id}' did not load within "
                           f"{self.settings.load_timeout_s:g}s", error_class="TIMEOUT", permanent=False) from None
        return worker

    def _place(self, cfg: ModelConfig) -> tuple[str, dict[str, str]]:
        """Device and environment for a new worker; one GPU per worker via CUDA_VISIBLE_DEVICES."""
        if self.settings.device in ("cuda", "gpu"):
            return "cuda", {"CUDA_VISIBLE_DEVICES": "0"}
        return "cpu", {"CUDA_VISIBLE_DEVICES": ""}

    # -- messages from workers --------------------------------------------------------------------------------------

    async def _receive_handshakes(self) -> None:
        while True:
            message = await self.channel.recv_handshake()
            worker = self.workers.get(getattr(message, "worker_id", ""))
            if worker is None or worker.ready.done():
                continue
            if isinstance(message, Ready):
                worker.ready.set_result(message)
            elif isinstance(message, LoadFailed):
                worker.ready.set_exception(SIEError("MODEL_LOAD_FAILED", f"model '{worker.key}' failed to load: "
                                                   f"{message.message}", error_class=message.error_class,
                                                   permanent=message.error_class in ("NOT_FOUND", "CONFIG")))

    async def _receive_results(self) -> None:
        while True:
            message = await self.channel.recv_result()
            if not isinstance(message, (BatchDone, BatchFailed)):
                continue
            for worker in self.workers.values():
                future = worker.in_flight.pop(message.batch_id, None)
                if future is not None:
                    if not future.done():
                        future.set_result(message)  # type: ignore[arg-type]
                    break

    def _on_exit(self, worker: Worker) -> None:
        """The worker's sentinel fired: it exited. Fail what it held; the next request restarts it."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(worker.process.sentinel)
        worker.process.join(0)
        code = worker.process.exitcode
        self.workers.pop(worker.worker_id, None)
        if not worker.ready.done():
            worker.ready.set_exception(SIEError(
                "MODEL_LOAD_FAILED", f"worker for '{worker.key}' exited with status {code} while loading",
                error_class="ENGINE", permanent=False))
        for future in worker.in_flight.values():
            if not future.done():
                future.set_exception(SIEError("MODEL_LOADING", f"the worker for '{worker.key}' stopped "
                                              f"(exit status {code}); retry shortly"))
        worker.in_flight.clear()
        slot = self.slots.get(worker.key)
        if slot is not None and slot.worker is worker:
            slot.worker = None
            slot.state = "available"
            if self.accepting:
                log.warning("worker for %s (pid %s) exited with status %s", worker.key, worker.process.pid, code)

    # -- batches ----------------------------------------------------------------------------------------------------

    async def run_batch(self, worker: Worker, make: Any) -> Result:
        """Send `make(batch_id)` to the worker and wait for its result."""
        batch_id = next(self.batch_ids)
        future: asyncio.Future[BatchDone] = asyncio.get_running_loop().create_future()
        worker.in_flight[batch_id] = future
        worker.last_used = time.monotonic()
        try:
            await self.channel.send(worker.worker_id, make(batch_id))
        except WorkerUnreachable:
            worker.in_flight.pop(batch_id, None)
            raise SIEError("MODEL_LOADING", f"the worker for '{worker.key}' is gone; retry shortly") from None
        reply = await future
        worker.batches_served += 1
        if isinstance(reply, BatchFailed):
            raise SIEError(reply.code if reply.code != "MODEL_LOAD_FAILED" else "INFERENCE_ERROR", reply.message)
        return reply.result

    # -- stopping ---------------------------------------------------------------------------------------------------

    def _stop_worker(self, worker: Worker) -> None:
        stop_processes([worker.process], 0)

    async def shutdown(self) -> None:
        """Stop admitting, let in-flight batches finish within the deadline, then stop every worker."""
        self.accepting = False
        deadline = time.monotonic() + self.settings.shutdown_deadline_s
        while any(w.in_flight for w in self.workers.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for worker in list(self.workers.values()):
            with contextlib.suppress(WorkerUnreachable):
                await self.channel.send(worker.worker_id, Shutdown())
        processes = [w.process for w in self.workers.values()]
        await asyncio.to_thread(stop_processes, processes, max(1.0, deadline - time.monotonic()))
        for task in self._tasks:
            task.cancel()
        self.channel.close()
