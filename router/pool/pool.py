"""WorkerPool (router process): the pool's facade. It owns the model slots and the wiring between its parts, hands
each model's queue out, sends batches to ready workers, and restarts a model whose worker died or hung.

Loading (`ensure`, then `loader.py`) gets a model a ready worker; `eviction.py` stops one; a model whose ready worker
died or hung is loaded again once its back-off is over, by the pool itself, and meanwhile requests get 503
`MODEL_LOADING` with Retry-After the time left. Processes, deadlines and the back-off are the supervisor's
(`supervisor.py`), memory and the recency of use are placement's (`placement.py`). Each model's slot (`slots.py`) also
holds its queue and its one pace model, which its queue learns and `run_batch` reads for the batch deadline.
States: available -> loading -> loaded -> (unloading ->) available, or failed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from sie_router import metrics
from sie_router.errors import SIEError
from sie_router.loops import Loop
from sie_router.models.config import ModelConfig
from sie_router.models.registry import Registry
from sie_router.pool.batcher import Batcher, BatchLimits, RunBatch, item_cap, request_item_cap
from sie_router.pool.devices import Devices
from sie_router.pool.eviction import Evictor
from sie_router.pool.ipc import WorkerLost
from sie_router.pool.ledger import MemoryLedger
from sie_router.pool.loader import Loader
from sie_router.pool.pacing import Pacer
from sie_router.pool.placement import Placement
from sie_router.pool.slots import ModelState, Slot, loaded_workers
from sie_router.pool.supervisor import Supervisor, Worker
from sie_router.settings import Settings
from sie_router.telemetry import Tracing
from sie_sdk.codes import ErrorCode
from sie_worker.protocol import BatchDone, BatchFailed, Message

__all__ = ["WorkerPool"]

log = logging.getLogger("sie.pool")


class WorkerPool:
    def __init__(self, settings: Settings, registry: Registry, devices: Devices) -> None:
        self.settings = settings
        self.registry = registry
        self.placement = Placement(settings, devices)
        self.supervisor = Supervisor(settings, on_exit=self._on_exit)
        # One dict, shared by the evictor and the loader: added and removed in place, never replaced.
        self.slots = {cfg.sie_id: Slot(key=cfg.sie_id, config=cfg) for cfg in registry.configs.values()}
        self.evictor = Evictor(settings, self.slots, self.placement, self.supervisor)
        self.loader = Loader(settings, self.slots, self.placement, self.supervisor, self.evictor)
        self.accepting = True
        self.started_at = time.time()
        self._loops: list[Loop] = []
        self._restarts: dict[str, asyncio.TimerHandle] = {}  # model key -> its restart once the back-off is over

    @property
    def devices(self) -> Devices:
        return self.placement.devices

    @property
    def ledger(self) -> MemoryLedger:
        return self.placement.ledger

    async def start(self) -> None:
        self.supervisor.start()
        if self.settings.idle_ttl_s > 0:
            self._loops.append(Loop(self.evictor.evict_idle, "sie-idle-ttl", "idle eviction"))
        for loop in self._loops:
            loop.start()

    # -- slots ------------------------------------------------------------------------------------------------------

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

    def remeasure(self) -> None:
        """Raise each loaded model's reservation to what its worker holds now (see `Placement.remeasure`)."""
        self.placement.remeasure(loaded_workers(self.slots))

    # -- queues -----------------------------------------------------------------------------------------------------

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
        items = item_cap(self.settings.max_batch_items, tokens, gpu)
        return BatchLimits(max_items=items, max_tokens=tokens, max_wait_ms=self.settings.max_wait_ms,
                           max_queue_items=self.settings.max_queue_items,
                           max_request_items=request_item_cap(self.settings.max_batch_items, items, gpu))

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

    # -- workers ----------------------------------------------------------------------------------------------------

    async def ensure(self, model: str, wait_s: float | None, *, evict: bool = True) -> Worker:
        """The model's ready worker; starts a load if needed (`Loader.ensure`). With `wait_s` None, a cold model
        raises at once. With `evict` False the load fails with RESOURCE_EXHAUSTED rather than evicting other models.
        """
        slot = self.slot(model)
        if slot.worker is not None and slot.worker.info is not None:
            return slot.worker
        if not self.accepting:
            raise SIEError(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        if slot.removing:
            raise SIEError(ErrorCode.MODEL_NOT_FOUND, f"model '{model}' was removed", param="model")
        return await self.loader.ensure(slot, wait_s, evict)

    def ready_worker(self, key: str) -> Worker:
        """The model's ready worker, for a batch of a job that `ensure`d it; MODEL_LOADING (retryable) when the
        worker has gone since: the pool starts another once its back-off is over."""
        worker = self.slots[key].worker
        if worker is None or worker.info is None:
            raise self.supervisor.restarts.restarting(key, "its worker has gone")
        return worker

    def _on_exit(self, worker: Worker, code: int | None) -> None:
        """A worker exited. Crashed or killed as hung or frozen: a new one starts after the back-off. Stopped: the
        next request starts a new one."""
        slot = self.slots.get(worker.key)
        if slot is None or slot.worker is not worker:
            return
        slot.worker, slot.state = None, ModelState.AVAILABLE
        self.placement.release(slot.key)
        if worker.backoff_s is not None and self.accepting:
            self._cancel_restart(slot.key)
            self._restarts[slot.key] = asyncio.get_running_loop().call_later(worker.backoff_s, self._restart,
                                                                              slot.key)

    def _restart(self, key: str) -> None:
        """The back-off of a model whose worker crashed is over: load it again, unless something already did, or
        it was evicted or removed or the server is stopping meanwhile. It evicts nothing: a request that needs room
        does."""
        self._restarts.pop(key, None)
        slot = self.slots.get(key)
        if (self.accepting and slot is not None and not slot.removing and slot.worker is None and slot.loading is None
                and slot.state == ModelState.AVAILABLE):
            log.info("restarting %s after its back-off", key)
            self.loader.start(slot, evict=False)

    def _cancel_restart(self, key: str) -> None:
        timer = self._restarts.pop(key, None)
        if timer is not None:
            timer.cancel()

    # -- batches ----------------------------------------------------------------------------------------------------

    async def run_batch(self, worker: Worker, make: Callable[[int], Message], items: int, cost: int) -> BatchDone:
        """Send `make(batch_id)` to the worker and wait, under the deadline of a batch of this cost, for its result."""
        self.placement.touch(worker.key)
        try:
            reply = await self.supervisor.call(worker, make, self.slots[worker.key].pace, cost)
        except WorkerLost as exc:
            raise self.supervisor.restarts.restarting(worker.key, str(exc)) from None
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
        """Stop a model's worker (`Evictor.evict`). An operator's eviction also forgets the model's back-off, so the
        next request loads it at once."""
        if reason == "admin":
            self.supervisor.restarts.forget(key)
            self._cancel_restart(key)
        return await self.evictor.evict(key, reason)

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
