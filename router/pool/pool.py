"""WorkerPool (router process): which models are loaded, loading or failed, and getting each one a ready worker.

`ensure` loads a model on demand (weights lookup, placement, then the supervisor's spawn); `evict` unloads one;
idle models are evicted after their TTL. Each model's slot also holds its queue (`queue`) and its one pace model,
which its queue learns and `run_batch` reads for the batch deadline. A model whose ready worker died or hung is
loaded again once its back-off is over, by the pool itself; meanwhile requests get 503 `MODEL_LOADING` with
Retry-After the time left. A load refused for memory is every request's answer (503 `RESOURCE_EXHAUSTED`) until memory
is freed or its hold passes (`Refusal`), and no request starts another meanwhile. Processes, deadlines and the
back-off are the supervisor's (`supervisor.py`), memory and the recency of use are placement's (`placement.py`).
States: available -> loading -> loaded -> (unloading ->) available, or failed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from typing import Any

from sie_router import metrics
from sie_router.errors import LoadError, SIEError
from sie_router.loops import Loop
from sie_router.models.config import ModelConfig
from sie_router.models.registry import Registry
from sie_router.models.weights import WeightsNotFound, WeightsQuery, resolve_weights
from sie_router.pool.batcher import Batcher, BatchLimits, RunBatch, item_cap
from sie_router.pool.devices import Devices, available_cpus, gpu_worker_env
from sie_router.pool.ipc import WorkerLost
from sie_router.pool.ledger import MemoryLedger
from sie_router.pool.pacing import BusyTimeFit, Pacer
from sie_router.pool.placement import Placement
from sie_router.pool.refusals import Refusal
from sie_router.pool.supervisor import Supervisor, Worker
from sie_router.settings import Settings
from sie_router.telemetry import Tracing
from sie_sdk.codes import ErrorCode
from sie_worker.protocol import (
    DEFAULT_ENGINE,
    BatchDone,
    BatchFailed,
    FamilyOptions,
    LoadErrorClass,
    Message,
    WorkerSpec,
)

__all__ = ["ModelState", "Slot", "Worker", "WorkerPool"]

log = logging.getLogger("sie.pool")

IDLE_CHECK_S = 1.0
MAX_COOLDOWN_FACTOR = 16  # a transient load failure that repeats waits twice as long each time, up to this factor
# The request that starts a load waits this long at most for placement's decision (see `WorkerPool._placed`).
PLACEMENT_WAIT_S = 2.0


class ModelState(StrEnum):
    """A model's load state, as `/v1/models` shows it."""

    AVAILABLE = "available"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


@dataclass
class Slot:
    """A model as the pool sees it: its config, its worker if any, its load state, its queue and its pace."""

    key: str
    config: ModelConfig
    state: ModelState = ModelState.AVAILABLE
    worker: Worker | None = None
    loading: asyncio.Task[Worker] | None = None
    load_error: LoadError | None = None
    load_started: float = 0.0
    failed_at: float = 0.0
    refusal: Refusal | None = None  # its last load was refused for memory
    placed: asyncio.Event = field(default_factory=asyncio.Event)  # set once its load in progress has memory reserved
    batcher: Batcher | None = None
    # Busy seconds per batch by its cost: learned by the batcher from the worker's own timing, read for deadlines.
    pace: BusyTimeFit = field(default_factory=BusyTimeFit)
    removing: bool = False  # unregistered: its admitted requests finish, and it never loads again

    @property
    def queued(self) -> int:
        return self.batcher.queued_items if self.batcher else 0

    @property
    def last_error(self) -> dict[str, Any] | None:
        return self.load_error.summary() if self.load_error else None


class WorkerPool:
    def __init__(self, settings: Settings, registry: Registry, devices: Devices) -> None:
        self.settings = settings
        self.registry = registry
        self.placement = Placement(settings, devices)
        self.supervisor = Supervisor(settings, on_exit=self._on_exit)
        self.slots = {cfg.sie_id: Slot(key=cfg.sie_id, config=cfg) for cfg in registry.configs.values()}
        self.accepting = True
        self.started_at = time.time()
        self._loops: list[Loop] = []
        self._restarts: dict[str, asyncio.TimerHandle] = {}  # model key -> its restart once the back-off is over
        # One load at a time per GPU: a worker measures its CUDA context as the GPU's free memory before and after
        # its load, which a neighbour loading beside it would distort.
        self._gpu_loads: dict[str, asyncio.Lock] = {}

    @property
    def devices(self) -> Devices:
        return self.placement.devices

    @property
    def ledger(self) -> MemoryLedger:
        return self.placement.ledger

    async def start(self) -> None:
        self.supervisor.start()
        if self.settings.idle_ttl_s > 0:
            self._loops.append(Loop(self._evict_idle, "sie-idle-ttl", "idle eviction"))
        for loop in self._loops:
            loop.start()

    def slot(self, model: str) -> Slot:
        """The slot of a model key (a request admitted before its model was removed still finds it), else of a
        served name."""
        found = self.slots.get(model)
        if found is not None:
            return found
        config, _ = self.registry.lookup(model)
        return self.slots[config.sie_id]

    def add(self, config: ModelConfig) -> None:
        """A slot for a model registered at runtime (before the registry serves it, so every served name has one)."""
        if config.sie_id in self.slots:
            raise SIEError(ErrorCode.MODEL_EXISTS, f"model '{config.sie_id}' is still being removed; retry shortly")
        self.slots[config.sie_id] = Slot(key=config.sie_id, config=config)

    async def remove(self, key: str) -> None:
        """Stop a removed model's worker (once its load, if one runs, has ended) and forget its slot."""
        slot = self.slots[key]
        slot.removing = True
        if slot.loading is not None:
            await asyncio.wait([slot.loading], timeout=self.settings.load_timeout_s)
        await self.evict(key, reason="admin")  # which also forgets its back-off
        self.slots.pop(key, None)
        self.placement.release(key)

    def busy(self, key: str) -> bool:
        slot = self.slots[key]
        return slot.queued > 0 or (slot.worker is not None and self.supervisor.busy(slot.worker))

    def queue(self, key: str, run: RunBatch, tracing: Tracing | None = None) -> Batcher:
        """The model's queue, made on first use: `run(batch_key, items)` sends one batch to its worker."""
        slot = self.slots[key]
        if slot.batcher is None:
            slot.batcher = Batcher(key, run, self.batch_limits(key), pacer=Pacer(fit=slot.pace), tracing=tracing)
            slot.batcher.start()
        return slot.batcher

    def batch_limits(self, key: str) -> BatchLimits:
        """A model's batch limits: on a server with GPUs, sized by tokens with the item cap following."""
        gpu = self.placement.has_gpus
        tokens = self.slots[key].config.max_batch_tokens(gpu=gpu)
        return BatchLimits(max_items=item_cap(self.settings.max_batch_items, tokens, gpu), max_tokens=tokens,
                           max_wait_ms=self.settings.max_wait_ms, max_queue_items=self.settings.max_queue_items)

    async def drain(self, key: str, deadline_s: float) -> bool:
        """Wait, up to the deadline, until a model's admitted requests have been answered; whether they were."""
        batcher = self.slots[key].batcher
        deadline = time.monotonic() + deadline_s
        while batcher is not None and not batcher.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return batcher is None or batcher.idle

    async def drop_queue(self, key: str) -> None:
        """A removed model's queue: what is still in it fails MODEL_NOT_FOUND, and its task stops."""
        slot = self.slots[key]
        batcher, slot.batcher = slot.batcher, None
        if batcher is not None:
            batcher.fail_queued(SIEError(ErrorCode.MODEL_NOT_FOUND, f"model '{key}' was removed", param="model"))
            await batcher.close()

    def queued_items(self) -> int:
        """Items queued across every model."""
        return sum(slot.queued for slot in self.slots.values())

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
            raise SIEError(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        if slot.removing:
            raise SIEError(ErrorCode.MODEL_NOT_FOUND, f"model '{model}' was removed", param="model")
        self._check_failed(slot)
        loading = slot.loading
        if loading is None:
            self._check_refused(slot, evict)
            self._start_load(slot, evict)
            loading = slot.loading
            assert loading is not None
            if await self._placed(slot, loading):
                return loading.result()  # it ended at once: refused for memory, or failed (or, fast, loaded)
        if wait_s is None or wait_s <= 0:
            raise SIEError(ErrorCode.MODEL_LOADING, f"model '{model}' is loading; retry shortly")
        try:
            return await asyncio.wait_for(asyncio.shield(loading), wait_s)
        except TimeoutError:
            raise SIEError(ErrorCode.MODEL_LOADING, f"model '{model}' is still loading after {wait_s:g}s") from None

    @staticmethod
    async def _placed(slot: Slot, loading: asyncio.Future[Worker]) -> bool:
        """Wait, up to PLACEMENT_WAIT_S, until placement has reserved memory for the load just started; whether the
        load has ended meanwhile. So the request that starts a load placement refuses is answered with the refusal,
        not MODEL_LOADING: a client told to come back after MODEL_LOADING's Retry-After would otherwise arrive once
        the refusal's hold is over, start the next load, and be told MODEL_LOADING again, forever. A download of the
        weights can outlast the wait; then the answer is MODEL_LOADING, as before."""
        placed = asyncio.ensure_future(slot.placed.wait())
        try:
            await asyncio.wait([loading, placed], timeout=PLACEMENT_WAIT_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            placed.cancel()
        return loading.done()

    def ready_worker(self, key: str) -> Worker:
        """The model's ready worker, for a batch of a job that `ensure`d it; MODEL_LOADING (retryable) when the
        worker has gone since: the pool starts another once its back-off is over."""
        worker = self.slots[key].worker
        if worker is None or worker.info is None:
            raise self.restarting(key, "its worker has gone")
        return worker

    def restarting(self, key: str, why: str) -> SIEError:
        """503 MODEL_LOADING for a model whose worker died or hung: Retry-After is the back-off left (at least 1 s,
        the header's unit), and the native body says how many restarts and how long."""
        backoff = self.supervisor.restarts.of(key)
        left = backoff.left()
        return SIEError(ErrorCode.MODEL_LOADING, f"{why}; model '{key}' is restarting" +
                        (f" in {left:.1f}s" if left else "") + ", retry shortly",
                        retry_after=max(1, math.ceil(left)), restarts=backoff.restarts, backoff_s=round(left, 3))

    def _check_failed(self, slot: Slot) -> None:
        """A model in its restart back-off answers 503 MODEL_LOADING (Retry-After the time left). Terminal answers
        (502, no Retry-After): a permanent load failure, or a transient one within its cooldown. After the cooldown
        the next request tries again, with no operator."""
        if slot.loading is None and slot.worker is None and self.supervisor.restarts.left(slot.key) > 0:
            raise self.restarting(slot.key, "its last worker died or hung")
        error = slot.load_error
        if slot.state != ModelState.FAILED or error is None or slot.loading is not None:
            return
        if error.permanent or time.monotonic() - slot.failed_at < self.cooldown(error):
            raise error.again(error.attempts)

    def _check_refused(self, slot: Slot, evict: bool) -> None:
        """A model whose last load was refused for memory answers that refusal, with Retry-After the time it still
        stands, and starts no load while it stands (`Refusal`)."""
        refusal = slot.refusal
        if refusal is None:
            return
        left = refusal.left(self.ledger.freed, evict)
        if left <= 0:
            slot.refusal = None
            return
        raise SIEError(ErrorCode.RESOURCE_EXHAUSTED, refusal.error.message, retry_after=max(1, math.ceil(left)))

    def _refused(self, slot: Slot, error: SIEError, evict: bool) -> None:
        """Placement refused the model's load for memory: count it, and let the refusal stand (`Refusal`)."""
        metrics.MODEL_LOADS.labels(slot.key, "refused").inc()
        hold = self.settings.load_refusal_hold_s
        slot.refusal = Refusal(error, self.ledger.freed, time.monotonic() + hold, evict)
        error.retry_after = max(1, math.ceil(hold))  # for the requests that waited on this load: when it may lift
        log.warning("not loading %s: %s", slot.key, error.message)

    def cooldown(self, error: LoadError) -> float:
        return self.settings.load_retry_cooldown_s * min(MAX_COOLDOWN_FACTOR, 2 ** (error.attempts - 1))

    def _start_load(self, slot: Slot, evict: bool) -> None:
        slot.placed.clear()
        slot.loading = asyncio.create_task(self._load(slot, evict), name=f"sie-load:{slot.key}")
        # Its failure is the slot's state and the answer of the requests that wait; nobody else reads it.
        slot.loading.add_done_callback(lambda task: task.cancelled() or task.exception())

    def _restart(self, key: str) -> None:
        """The back-off of a model whose worker crashed is over: load it again, unless something already did, or
        it was evicted or removed or the server is stopping meanwhile. It evicts nothing: a request that needs room
        does."""
        self._restarts.pop(key, None)
        slot = self.slots.get(key)
        if (self.accepting and slot is not None and not slot.removing and slot.worker is None and slot.loading is None
                and slot.state == ModelState.AVAILABLE):
            log.info("restarting %s after its back-off", key)
            self._start_load(slot, evict=False)

    async def _load(self, slot: Slot, evict: bool) -> Worker:
        slot.state, slot.load_started = ModelState.LOADING, time.monotonic()
        try:
            worker = await self._start_worker(slot, evict)
        except LoadError as exc:
            metrics.MODEL_LOADS.labels(slot.key, "failure").inc()
            slot.state, slot.failed_at = ModelState.FAILED, time.monotonic()
            slot.load_error = exc.again((slot.load_error.attempts if slot.load_error else 0) + 1)
            self.placement.release(slot.key)
            raise slot.load_error from None
        except SIEError as exc:  # no room right now (RESOURCE_EXHAUSTED): retryable
            slot.state = ModelState.AVAILABLE
            self.placement.release(slot.key)  # what it held while its worker loaded (refused during an export)
            self._refused(slot, exc, evict)
            raise
        finally:
            slot.loading = None
        slot.state, slot.worker, slot.load_error, slot.refusal = ModelState.LOADED, worker, None, None
        slot.pace.reset()  # a new process learns its own pace; until then its batches get the full deadline
        info = worker.info
        assert info is not None
        if info.device != worker.device:  # --device auto, and the worker's torch had no CUDA: it runs on the CPU
            self.placement.move(slot.key, info.device)
            worker.device = info.device
        measured = self.placement.settle(slot.key, info.pid, worker.device, info.memory_bytes, info.context_bytes,
                                         engine=info.engine)
        await self._fit(slot, worker.device, evict)
        metrics.MODEL_LOADS.labels(slot.key, "success").inc()
        metrics.MODEL_LOAD_DURATION.labels(slot.key).observe(time.monotonic() - slot.load_started)
        log.info("model %s ready on %s in %.1fs (pid %d, %.0f MiB)", slot.key, worker.device,
                 time.monotonic() - slot.load_started, info.pid, measured / 2**20)
        return worker

    async def _fit(self, slot: Slot, device: str, evict: bool) -> None:
        """The estimate was low: evict LRU idle models until the measured figures fit the budget again, or, when
        none can go and the overrun is beyond the tolerance, stop this worker and fail the load (retryable)."""
        try:
            victims = self.placement.fit(slot.key, device, lambda k: evict and self._evictable(k))
        except SIEError as exc:
            await self.evict(slot.key, reason="memory")
            self._refused(slot, exc, evict)
            raise
        for victim in victims:
            await self.evict(victim, reason="memory")

    def remeasure(self) -> None:
        """Raise each loaded model's reservation to what its worker holds now (see `Placement.remeasure`)."""
        self.placement.remeasure((key, s.worker.info.pid, s.worker.device, s.worker.info.memory_bytes,
                                  s.worker.info.context_bytes) for key, s in self.slots.items()
                                 if s.state == ModelState.LOADED and s.worker is not None and s.worker.info is not None)

    async def _reserve(self, slot: Slot, nbytes: int, evict: bool) -> str:
        """Reserve `nbytes` on the device with the most free budget, evicting LRU idle models if needed."""
        self.remeasure()
        device, victims = self.placement.plan(slot.key, nbytes, lambda k: evict and self._evictable(k))
        for victim in victims:
            await self.evict(victim, reason="memory")
        self.placement.reserve(slot.key, device, nbytes)
        return device

    def _evictable(self, key: str) -> bool:
        slot = self.slots[key]
        return slot.state == ModelState.LOADED and not self.pinned(key) and not self.busy(key)

    async def _start_worker(self, slot: Slot, evict: bool) -> Worker:
        cfg = slot.config
        query = WeightsQuery(model_id=cfg.sie_id, hf_id=cfg.hf_id, weights_path=cfg.weights_path,
                             package_dir=cfg.package_dir, revision=cfg.hf_revision)
        try:
            folder, origin = (("", "none") if cfg.package_backed else
                              await asyncio.to_thread(resolve_weights, query, offline=self.settings.hf_offline))
        except WeightsNotFound as exc:
            log.error("cannot load %s: %s", cfg.sie_id, exc)
            retry = exc.transient or exc.unreachable
            raise LoadError(LoadErrorClass.NETWORK if retry else LoadErrorClass.NOT_FOUND, str(exc)) from None
        options = self._options(cfg)  # before the reservation: a refused setting fails here, holding nothing
        engine = getattr(options, "engine", DEFAULT_ENGINE)
        device = await self._reserve(slot, self.placement.estimate(slot.key, cfg, str(folder), engine), evict)
        slot.placed.set()
        spec = self._spec(cfg, str(folder), device, options)
        log.info("loading %s: %s adapter, weights from %s (%s), on %s", cfg.sie_id, spec.adapter, folder or "-",
                 origin, device)
        on_export = partial(self._reserve_export, slot, evict)
        if device == "cpu":
            return await self.supervisor.spawn(spec, slot.key, on_export)
        async with self._gpu_loads.setdefault(device, asyncio.Lock()):
            return await self.supervisor.spawn(spec, slot.key, on_export)

    async def _reserve_export(self, slot: Slot, evict: bool) -> None:
        """The loading worker starts a graph export: reserve the helper's memory beside the worker's until its Ready,
        evicting LRU idle models if needed; RESOURCE_EXHAUSTED (the worker is then stopped) when it cannot fit."""
        extra, victims = self.placement.plan_export(slot.key, lambda k: evict and self._evictable(k))
        if not extra:
            return  # its reservation has held the helper from the start (its last load exported and never got ready)
        for victim in victims:
            await self.evict(victim, reason="memory")
        self.placement.grow(slot.key, extra)
        log.info("%s exports its graph first: %.0f MiB more reserved until it is ready", slot.key, extra / 2**20)

    def _spec(self, cfg: ModelConfig, folder: str, device: str, options: FamilyOptions | None) -> WorkerSpec:
        profile = cfg.profiles["default"]
        to_worker, from_worker = self.supervisor.worker_endpoints
        # One GPU (or MIG slice) per worker, named by UUID: the child sees only its own, as cuda:0.
        visible = self.devices.cuda_visible(device)
        return WorkerSpec(
            worker_id=uuid.uuid4().hex[:12], model=cfg.sie_id, adapter=cfg.family(), weights_dir=folder,
            to_worker_endpoint=to_worker, from_worker_endpoint=from_worker,
            device=device,
            compute_precision=profile.compute_precision if self.settings.dtype == "auto" else self.settings.dtype,
            max_sequence_length=cfg.max_sequence_length,
            options=options,
            threads=self.settings.worker_threads or available_cpus(),
            env={**(gpu_worker_env(os.environ) if device != "cpu" else {}), **self.settings.extra_env,
                 "CUDA_VISIBLE_DEVICES": visible},
            cpu_fallback=self.settings.device == "auto",  # a torch without CUDA then runs the worker on the CPU
            trust_remote_code=self.settings.trust_remote_code,
            max_batch_tokens=cfg.max_batch_tokens(gpu=device != "cpu"), log_format=self.settings.log_format,
            otlp_endpoint=self.settings.otlp_endpoint, otlp_service_name=self.settings.otlp_service_name)

    def _options(self, cfg: ModelConfig) -> FamilyOptions | None:
        """The default profile's options, over the server's engine, lanes and image limits; None for a family
        without options of its own (its worker then fails to load, naming the family)."""
        server = {"engine": self.settings.engine, "onnx_lanes": self.settings.onnx_lanes,
                  "max_image_pixels": self.settings.max_image_pixels, "max_image_bytes": self.settings.max_image_bytes}
        try:
            options = cfg.options(server=server)
        except ValueError as exc:  # a server setting the family's Struct refuses
            raise LoadError(LoadErrorClass.CONFIG, f"model '{cfg.sie_id}': {exc}") from None
        return options if isinstance(options, FamilyOptions) else None

    def _on_exit(self, worker: Worker, code: int | None) -> None:
        """A worker exited. Crashed or killed as hung or frozen: a new one starts after the back-off. Stopped: the
        next request starts a new one."""
        slot = self.slots.get(worker.key)
        if slot is None or slot.worker is not worker:
            return
        slot.worker, slot.state = None, ModelState.AVAILABLE
        self.placement.release(slot.key)
        if worker.backoff_s is not None and self.accepting:
            timer = self._restarts.pop(slot.key, None)
            if timer is not None:
                timer.cancel()
            self._restarts[slot.key] = asyncio.get_running_loop().call_later(worker.backoff_s, self._restart,
                                                                              slot.key)

    # -- batches ----------------------------------------------------------------------------------------------------

    async def run_batch(self, worker: Worker, make: Callable[[int], Message], items: int, cost: int) -> BatchDone:
        """Send `make(batch_id)` to the worker and wait, under the deadline of a batch of this cost, for its result."""
        self.placement.touch(worker.key)
        try:
            reply = await self.supervisor.call(worker, make, self.slots[worker.key].pace, cost)
        except WorkerLost as exc:
            raise self.restarting(worker.key, str(exc)) from None
        worker.batches_served += 1
        worker.items_served += items
        if isinstance(reply, BatchFailed):
            code = reply.code if reply.code != ErrorCode.MODEL_LOAD_FAILED else ErrorCode.INFERENCE_ERROR
            raise SIEError(code, reply.message)
        self._observe(worker.key, reply)
        self._follow_growth(worker, reply)
        return reply

    def _follow_growth(self, worker: Worker, reply: BatchDone) -> None:
        """A GPU worker's allocator grew under traffic: its own figure (`info.memory_bytes`, what it reported at Ready
        until now) rises, and so does its reservation. Where NVML has a per-process figure, that figure still wins."""
        info = worker.info
        if info is None or reply.memory_reserved <= info.memory_bytes:
            return
        info.memory_bytes = reply.memory_reserved
        self.placement.remeasure([(worker.key, info.pid, worker.device, info.memory_bytes, info.context_bytes)])

    @staticmethod
    def _observe(key: str, reply: BatchDone) -> None:
        kind = type(reply.result).__name__.removesuffix("Result").lower()
        for phase, ms in (("tokenize", reply.timing.tokenize_ms), ("inference", reply.timing.inference_ms),
                          ("postprocess", reply.timing.postprocess_ms)):
            metrics.REQUEST_DURATION.labels(key, kind, phase).observe(ms / 1000.0)
        metrics.TOKENS.labels(key).inc(sum(reply.result.token_counts))

    # -- eviction and stopping --------------------------------------------------------------------------------------

    async def evict(self, key: str, reason: str) -> bool:
        """Stop a model's worker: queued requests fail retryably, in-flight batches finish within the deadline.
        An operator's eviction also forgets the model's back-off and failed load, so the next request loads it."""
        slot = self.slots[key]
        if reason == "admin":
            self.supervisor.restarts.forget(key)
            timer = self._restarts.pop(key, None)
            if timer is not None:
                timer.cancel()
        if slot.state == ModelState.FAILED:
            slot.state, slot.load_error = ModelState.AVAILABLE, None
        worker = slot.worker
        if worker is None:
            return False
        log.info("evicting %s (%s)", key, reason)
        metrics.EVICTIONS.labels(key, reason).inc()
        slot.state, worker.stopping = ModelState.UNLOADING, True
        if slot.batcher is not None:
            slot.batcher.fail_queued(SIEError(ErrorCode.MODEL_LOADING,
                                              f"model '{key}' was evicted; retry to reload it"))
        deadline = time.monotonic() + self.settings.shutdown_deadline_s
        while self.supervisor.busy(worker) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await self.supervisor.stop([worker], deadline - time.monotonic())
        if slot.worker is worker:  # the sentinel callback normally clears it first
            slot.worker, slot.state = None, ModelState.AVAILABLE
            self.placement.release(key)
        return True

    async def _evict_idle(self) -> None:
        while True:
            await asyncio.sleep(IDLE_CHECK_S)
            now = time.monotonic()
            for slot in list(self.slots.values()):
                try:
                    used = self.placement.last_used(slot.key)
                    if (slot.worker is not None and used is not None and self._evictable(slot.key)
                            and now - used > self.settings.idle_ttl_s):
                        await self.evict(slot.key, reason="idle")
                except Exception as exc:
                    exc.add_note(f"while checking whether model '{slot.key}' is idle")  # the log names the model
                    raise

    async def shutdown(self) -> None:
        """Close the queues (what is queued fails with SHUTTING_DOWN), stop admitting, let in-flight batches finish
        within the deadline, then stop every worker."""
        await asyncio.gather(*(slot.batcher.close() for slot in self.slots.values() if slot.batcher is not None))
        self.accepting = False
        for timer in self._restarts.values():
            timer.cancel()
        deadline = time.monotonic() + self.settings.shutdown_deadline_s
        while self.supervisor.calls_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for loop in self._loops:
            await loop.stop()
        await self.supervisor.stop(list(self.supervisor.workers.values()), deadline - time.monotonic())
        await self.supervisor.close()
