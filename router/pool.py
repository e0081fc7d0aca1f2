"""WorkerPool (router process): one supervised worker process per loaded model.

It starts workers on demand under a memory ledger (evicting least-recently-used idle models when a new one does
not fit), completes their `Ready` handshake, routes batches and results by `batch_id`, and notices a dead worker
through its process sentinel: the worker's in-flight batches fail retryably and the next request restarts it,
within a crash budget. States: available -> loading -> loaded -> (unloading ->) available, or failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sie_router import metrics
from sie_router.devices import Devices
from sie_router.errors import SIEError
from sie_router.ipc import Channel, WorkerUnreachable
from sie_router.ledger import MemoryLedger
from sie_router.processes import spawn_worker, stop_processes
from sie_router.registry import ModelConfig, Registry
from sie_router.settings import Settings
from sie_router.weights import WeightsNotFound, WeightsQuery, resolve_weights
from sie_worker.protocol import BatchDone, BatchFailed, LoadFailed, Ready, Shutdown, WorkerSpec

if TYPE_CHECKING:
    from sie_router.batcher import Batcher

log = logging.getLogger("sie.pool")

# After a transient load failure, requests get the failure (502, no retry) for this long before a new attempt.
LOAD_RETRY_COOLDOWN_S = 30.0
# Estimate for a model whose config gives none: its weight files times this factor.
WEIGHTS_MEMORY_FACTOR = 1.5
DEFAULT_ESTIMATE = 512 * 2**20
IDLE_CHECK_S = 1.0


@dataclass
class Worker:
    """One worker process and what the router knows about it."""

    worker_id: str
    key: str
    process: BaseProcess
    device: str
    ready: asyncio.Future[Ready]
    info: Ready | None = None
    started_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    batches_served: int = 0
    items_served: int = 0
    stopping: bool = False  # evicted or shut down: its exit is not a crash


@dataclass
class Slot:
    """A model as the pool sees it: its config, its worker if any, its load state and its queue."""

    key: str
    config: ModelConfig
    state: str = "available"
    worker: Worker | None = None
    loading: asyncio.Task[Worker] | None = None
    last_error: dict[str, Any] | None = None
    load_started: float = 0.0
    failed_at: float = 0.0
    crashes: deque[float] = field(default_factory=deque)
    batcher: Batcher | None = None

    @property
    def queued(self) -> int:
        return self.batcher.queued_items if self.batcher else 0


class WorkerPool:
    def __init__(self, settings: Settings, registry: Registry, devices: Devices) -> None:
        self.settings = settings
        self.registry = registry
        self.devices = devices
        self.ledger = MemoryLedger(self._budgets())
        self.channel = Channel()
        self.slots = {cfg.sie_id: Slot(key=cfg.sie_id, config=cfg) for cfg in registry.configs.values()}
        self.workers: dict[str, Worker] = {}
        self.in_flight: dict[int, tuple[Worker, asyncio.Future[BatchDone | BatchFailed]]] = {}
        self.batch_ids = itertools.count(1)
        self.accepting = True
        self.started_at = time.time()
        self._tasks: list[asyncio.Task[None]] = []

    def _budgets(self) -> dict[str, int]:
        budgets = {}
        for device in self.devices.snapshot():
            if device.name == "cpu":
                budgets["cpu"] = self.settings.memory_budget or int(device.total * 0.8)
            else:
                budgets[device.name] = int(device.total * self.settings.gpu_memory_fraction)
        return budgets

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._receive_handshakes(), name="sie-handshakes"),
                       asyncio.create_task(self._receive_results(), name="sie-results")]
        if self.settings.idle_ttl_s > 0:
            self._tasks.append(asyncio.create_task(self._evict_idle(), name="sie-idle-ttl"))

    def slot(self, model: str) -> Slot:
        config, _ = self.registry.lookup(model)
        return self.slots[config.sie_id]

    def busy(self, key: str) -> bool:
        slot = self.slots[key]
        worker = slot.worker
        return slot.queued > 0 or (worker is not None and any(w is worker for w, _ in self.in_flight.values()))

    def pinned(self, key: str) -> bool:
        return key in self.settings.pinned

    # -- loading ----------------------------------------------------------------------------------------------------

    async def ensure(self, model: str, wait_s: float | None, *, evict: bool = True) -> Worker:
        """The model's ready worker; starts a load if needed. With `wait_s` None, a cold model raises at once.

        With `evict` False the load fails with RESOURCE_EXHAUSTED rather than evicting other models.
        """
        slot = self.slot(model)
        if slot.worker is not None and slot.worker.info is not None:
            return slot.worker
        if not self.accepting:
            raise SIEError("SHUTTING_DOWN", "the server is shutting down")
        self._check_failed(slot)
        if slot.loading is None:
            slot.loading = asyncio.create_task(self._load(slot, evict), name=f"sie-load:{slot.key}")
        if wait_s is None or wait_s <= 0:
            raise SIEError("MODEL_LOADING", f"model '{model}' is loading; retry shortly")
        try:
            return await asyncio.wait_for(asyncio.shield(slot.loading), wait_s)
        except TimeoutError:
            raise SIEError("MODEL_LOADING", f"model '{model}' is still loading after {wait_s:g}s") from None

    def _check_failed(self, slot: Slot) -> None:
        """Terminal answers: a failed load within its cooldown, or a spent crash budget (502, no Retry-After)."""
        now = time.monotonic()
        while slot.crashes and now - slot.crashes[0] > self.settings.crash_window_s:
            slot.crashes.popleft()
        if len(slot.crashes) >= self.settings.crash_budget:
            raise SIEError("MODEL_LOAD_FAILED", f"model '{slot.key}' crashed {len(slot.crashes)} times in "
                           f"{self.settings.crash_window_s:g}s; evict it (sie-admin workers evict) to retry now",
                           error_class="ENGINE", permanent=False, attempts=len(slot.crashes))
        if slot.state == "failed" and slot.last_error and slot.loading is None:
            permanent = bool(slot.last_error.get("permanent"))
            if permanent or now - slot.failed_at < LOAD_RETRY_COOLDOWN_S:
                raise SIEError("MODEL_LOAD_FAILED", slot.last_error["message"], error_class=slot.last_error["code"],
                               permanent=permanent, attempts=slot.last_error["attempts"])

    async def _load(self, slot: Slot, evict: bool) -> Worker:
        slot.state, slot.load_started = "loading", time.monotonic()
        try:
            worker = await self._start_worker(slot, evict)
        except SIEError as exc:
            metrics.MODEL_LOADS.labels(slot.key, "failure").inc()
            slot.state, slot.failed_at = "failed", time.monotonic()
            attempts = (slot.last_error or {}).get("attempts", 0) + 1
            slot.last_error = {"code": exc.extra.get("error_class", "UNKNOWN"), "message": exc.message,
                               "attempts": attempts, "permanent": exc.extra.get("permanent", True)}
            if exc.code != "RESOURCE_EXHAUSTED":
                self.ledger.release(slot.key)
            else:
                slot.state = "available"
            raise
        finally:
            slot.loading = None
        slot.state, slot.worker, slot.last_error = "loaded", worker, None
        worker.last_used = time.monotonic()  # idle time counts from readiness, not from the spawn
        info = worker.info
        assert info is not None
        measured = self.devices.process_memory(info.pid, worker.device) or info.memory_bytes
        self.ledger.settle(slot.key, measured)
        metrics.MODEL_LOADS.labels(slot.key, "success").inc()
        metrics.MODEL_LOAD_DURATION.labels(slot.key).observe(time.monotonic() - slot.load_started)
        log.info("model %s ready on %s in %.1fs (pid %d, %.0f MiB)", slot.key, worker.device,
                 time.monotonic() - slot.load_started, info.pid, measured / 2**20)
        return worker

    def estimate(self, config: ModelConfig, folder: str) -> int:
        if config.memory_mb:
            return config.memory_mb * 2**20
        if not folder:
            return DEFAULT_ESTIMATE
        weights = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.suffix in (".safetensors", ".bin", ".pt"))
        return int(weights * WEIGHTS_MEMORY_FACTOR) or DEFAULT_ESTIMATE

    def remeasure(self) -> None:
        """Raise each loaded model's reservation to what its worker holds now, if that is more.

        The figure taken at Ready is not a ceiling: the torch engine's allocator and oneDNN caches grow with the batch
        shapes traffic brings (all-MiniLM-L6-v2 in bf16: 530 MiB at Ready, 890 under the soak's mix, then flat).
        Eviction plans and the memory metrics must see the grown figure, or the budget is overrun. Reservations only
        rise: memory a worker gave back it can take again."""
        for key, slot in self.slots.items():
            worker = slot.worker
            if slot.state != "loaded" or worker is None or worker.info is None:
                continue
            measured, reserved = self.devices.process_memory(worker.info.pid, worker.device), self.ledger.reserved(key)
            if measured and reserved is not None and measured > reserved:
                self.ledger.settle(key, measured)

    async def _reserve(self, slot: Slot, nbytes: int, evict: bool) -> str:
        """Pick the device with the most free budget and reserve `nbytes`, evicting LRU idle models if needed."""
        self.remeasure()
        device = self.ledger.best_device()
        plan = self.ledger.eviction_plan(device, nbytes, lambda k: evict and k != slot.key and self._evictable(k))
        if plan is None:
            free = self.ledger.devices[device].free
            raise SIEError("RESOURCE_EXHAUSTED", f"model '{slot.key}' needs about {nbytes / 2**20:.0f} MiB on "
                           f"{device}, {free / 2**20:.0f} MiB is free and no idle model can be evicted")
        for victim in plan:
            await self.evict(victim, reason="memory")
        self.ledger.reserve(slot.key, device, nbytes)
        return device

    def _evictable(self, key: str) -> bool:
        slot = self.slots[key]
        return slot.state == "loaded" and not self.pinned(key) and not self.busy(key)

    async def _start_worker(self, slot: Slot, evict: bool) -> Worker:
        cfg = slot.config
        query = WeightsQuery(model_id=cfg.sie_id, hf_id=cfg.hf_id, weights_path=cfg.weights_path,
                             package_dir=cfg.package_dir, revision=cfg.hf_revision)
        try:
            folder, origin = (("", "none") if cfg.package_backed else
                              await asyncio.to_thread(resolve_weights, query, offline=self.settings.hf_offline))
        except WeightsNotFound as exc:
            log.error("cannot load %s: %s", cfg.sie_id, exc)
            raise SIEError("MODEL_LOAD_FAILED", str(exc), error_class="NOT_FOUND",
                           permanent=not exc.transient) from None
        device = await self._reserve(slot, self.estimate(cfg, str(folder)), evict)
        spec = self._spec(cfg, str(folder), device)
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
            worker.stopping = True
            await asyncio.to_thread(stop_processes, [worker.process], 5.0)
            raise SIEError("MODEL_LOAD_FAILED", f"model '{cfg.sie_id}' did not load within "
                           f"{self.settings.load_timeout_s:g}s", error_class="TIMEOUT", permanent=False) from None
        return worker

    def _spec(self, cfg: ModelConfig, folder: str, device: str) -> WorkerSpec:
        profile = cfg.profiles["default"]
        # One GPU per worker: the child sees only its own, as cuda:0.
        visible = device.split(":")[1] if device.startswith("cuda:") else ""
        return WorkerSpec(
            worker_id=uuid.uuid4().hex[:12], model=cfg.sie_id, adapter=cfg.family(), weights_dir=folder,
            to_worker_endpoint=self.channel.to_worker_endpoint,
            from_worker_endpoint=self.channel.from_worker_endpoint, device=device,
            compute_precision=profile.compute_precision if self.settings.dtype == "auto" else self.settings.dtype,
            max_sequence_length=cfg.max_sequence_length,
            loadtime={"engine": self.settings.engine, "onnx_lanes": self.settings.onnx_lanes,
                      "max_image_pixels": self.settings.max_image_pixels,
                      "max_image_bytes": self.settings.max_image_bytes, **profile.adapter_options.loadtime},
            runtime=profile.adapter_options.runtime,
            threads=self.settings.worker_threads or (os.cpu_count() or 1),
            env={**self.settings.extra_env, "CUDA_VISIBLE_DEVICES": visible},
            max_batch_tokens=profile.max_batch_tokens or 16384)

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
            if isinstance(message, (BatchDone, BatchFailed)):
                _, future = self.in_flight.pop(message.batch_id, (None, None))
                if future is not None and not future.done():
                    future.set_result(message)

    def _on_exit(self, worker: Worker) -> None:
        """The worker's sentinel fired: it exited. Fail what it held; the next request restarts it."""
        asyncio.get_running_loop().remove_reader(worker.process.sentinel)
        worker.process.join(0)
        code = worker.process.exitcode
        self.workers.pop(worker.worker_id, None)
        if not worker.ready.done():
            worker.ready.set_exception(SIEError(
                "MODEL_LOAD_FAILED", f"worker for '{worker.key}' exited with status {code} while loading",
                error_class="ENGINE", permanent=False))
        for batch_id, (owner, future) in list(self.in_flight.items()):
            if owner is worker:
                del self.in_flight[batch_id]
                if not future.done():
                    future.set_exception(SIEError("MODEL_LOADING", f"the worker for '{worker.key}' stopped "
                                                  f"(exit status {code}); retry shortly"))
        slot = self.slots.get(worker.key)
        if slot is None or slot.worker is not worker:
            return
        slot.worker, slot.state = None, "available"
        self.ledger.release(slot.key)
        if not worker.stopping:
            slot.crashes.append(time.monotonic())
            metrics.WORKER_RESTARTS.labels(slot.key).inc()
            log.warning("worker for %s (pid %s) died with status %s (%d recent crashes)", worker.key,
                        worker.process.pid, code, len(slot.crashes))

    # -- batches ----------------------------------------------------------------------------------------------------

    async def run_batch(self, worker: Worker, make: Any, items: int) -> BatchDone:
        """Send `make(batch_id)` to the worker and wait for its result (with the worker's timing of it)."""
        batch_id = next(self.batch_ids)
        future: asyncio.Future[BatchDone | BatchFailed] = asyncio.get_running_loop().create_future()
        self.in_flight[batch_id] = (worker, future)
        worker.last_used = time.monotonic()
        self.ledger.touch(worker.key)
        try:
            await self.channel.send(worker.worker_id, make(batch_id))
        except WorkerUnreachable:
            self.in_flight.pop(batch_id, None)
            raise SIEError("MODEL_LOADING", f"the worker for '{worker.key}' is gone; retry shortly") from None
        reply = await future
        worker.batches_served += 1
        worker.items_served += items
        if isinstance(reply, BatchFailed):
            raise SIEError(reply.code if reply.code != "MODEL_LOAD_FAILED" else "INFERENCE_ERROR", reply.message)
        self._observe(worker.key, reply)
        return reply

    @staticmethod
    def _observe(key: str, reply: BatchDone) -> None:
        kind = type(reply.result).__name__.removesuffix("Result").lower()
        for phase, ms in (("tokenize", reply.timing.tokenize_ms), ("inference", reply.timing.inference_ms),
                          ("postprocess", reply.timing.postprocess_ms)):
            metrics.REQUEST_DURATION.labels(key, kind, phase).observe(ms / 1000.0)
        metrics.TOKENS.labels(key).inc(sum(reply.result.token_counts))

    # -- eviction and stopping --------------------------------------------------------------------------------------

    async def evict(self, key: str, reason: str) -> bool:
        """Stop a model's worker: queued requests fail retryably, in-flight batches finish within the deadline."""
        slot = self.slots[key]
        slot.crashes.clear()
        if slot.state == "failed":
            slot.state, slot.last_error = "available", None
        worker = slot.worker
        if worker is None:
            return False
        log.info("evicting %s (%s)", key, reason)
        metrics.EVICTIONS.labels(key, reason).inc()
        slot.state, worker.stopping = "unloading", True
        if slot.batcher is not None:
            slot.batcher.fail_queued(SIEError("MODEL_LOADING", f"model '{key}' was evicted; retry to reload it"))
        deadline = time.monotonic() + self.settings.shutdown_deadline_s
        while any(w is worker for w, _ in self.in_flight.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        with contextlib.suppress(WorkerUnreachable):
            await self.channel.send(worker.worker_id, Shutdown())
        await asyncio.to_thread(stop_processes, [worker.process], max(1.0, deadline - time.monotonic()))
        if slot.worker is worker:  # the sentinel callback normally clears it first
            slot.worker, slot.state = None, "available"
            self.ledger.release(key)
        return True

    async def _evict_idle(self) -> None:
        while True:
            await asyncio.sleep(IDLE_CHECK_S)
            now = time.monotonic()
            for slot in list(self.slots.values()):
                worker = slot.worker
                if (worker is not None and slot.state == "loaded" and self._evictable(slot.key)
                        and now - worker.last_used > self.settings.idle_ttl_s):
                    await self.evict(slot.key, reason="idle")

    async def shutdown(self) -> None:
        """Stop admitting, let in-flight batches finish within the deadline, then stop every worker."""
        self.accepting = False
        deadline = time.monotonic() + self.settings.shutdown_deadline_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for worker in list(self.workers.values()):
            worker.stopping = True
            with contextlib.suppress(WorkerUnreachable):
                await self.channel.send(worker.worker_id, Shutdown())
        processes = [w.process for w in self.workers.values()]
        await asyncio.to_thread(stop_processes, processes, max(1.0, deadline - time.monotonic()))
        for task in self._tasks:
            task.cancel()
        self.channel.close()
