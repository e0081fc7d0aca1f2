"""Eviction (router process): which loaded models may be stopped to free memory or because they sat idle, and
stopping one. Its callers pick the reason: the loader evicts LRU idle models for memory (placement names them), the
idle loop evicts after `idle_ttl_s`, an operator evicts through the pool (which also forgets the model's back-off)."""

from __future__ import annotations

import asyncio
import logging
import time

from sie_router import metrics
from sie_router.errors import SIEError
from sie_router.pool.placement import Placement
from sie_router.pool.slots import ModelState, Slot
from sie_router.pool.supervisor import Supervisor
from sie_router.settings import Settings
from sie_sdk.codes import ErrorCode

log = logging.getLogger("sie.pool")

IDLE_CHECK_S = 1.0


class Evictor:
    """Stops models' workers; shares the pool's slots, placement and supervisor."""

    def __init__(self, settings: Settings, slots: dict[str, Slot], placement: Placement,
                 supervisor: Supervisor) -> None:
        self.settings = settings
        self.slots = slots
        self.placement = placement
        self.supervisor = supervisor

    def pinned(self, key: str) -> bool:
        return key in self.settings.pinned

    def busy(self, key: str) -> bool:
        slot = self.slots[key]
        return slot.queued > 0 or (slot.worker is not None and self.supervisor.busy(slot.worker))

    def evictable(self, key: str) -> bool:
        slot = self.slots[key]
        return slot.state == ModelState.LOADED and not self.pinned(key) and not self.busy(key)

    async def evict(self, key: str, reason: str) -> bool:
        """Stop a model's worker: queued requests fail retryably, in-flight batches finish within the deadline.
        A failed load is forgotten too, so the next request loads it again."""
        slot = self.slots[key]
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

    async def evict_idle(self) -> None:
        """The idle loop's body: every IDLE_CHECK_S, evict the evictable models unused for `idle_ttl_s`."""
        while True:
            await asyncio.sleep(IDLE_CHECK_S)
            now = time.monotonic()
            for slot in list(self.slots.values()):
                try:
                    used = self.placement.last_used(slot.key)
                    if (slot.worker is not None and used is not None and self.evictable(slot.key)
                            and now - used > self.settings.idle_ttl_s):
                        await self.evict(slot.key, reason="idle")
                except Exception as exc:
                    exc.add_note(f"while checking whether model '{slot.key}' is idle")  # the log names the model
                    raise
