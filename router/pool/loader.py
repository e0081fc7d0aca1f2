"""Loading models (router process): a slot's load from request to ready worker, and the answers while it cannot be.

`ensure` starts a load on demand (weights lookup, placement, then the supervisor's spawn) and waits for it; loads that
fail are retried after a cooldown, loads refused for memory answer every request until memory is freed or the
refusal's hold passes (`Refusal`), and a model in its restart back-off answers 503 MODEL_LOADING. Memory comes from
placement, evicting LRU idle models through the evictor; what a worker is started with is `launch.py`'s.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from functools import partial

from sie_router import metrics
from sie_router.errors import LoadError, SIEError
from sie_router.pool.eviction import Evictor
from sie_router.pool.launch import family_options, find_weights, worker_spec
from sie_router.pool.placement import Placement
from sie_router.pool.refusals import Refusal
from sie_router.pool.slots import ModelState, Slot, loaded_workers
from sie_router.pool.supervisor import Supervisor, Worker
from sie_router.settings import Settings
from sie_sdk.codes import ErrorCode
from sie_worker.options import DEFAULT_ENGINE

log = logging.getLogger("sie.pool")

MAX_COOLDOWN_FACTOR = 16  # a transient load failure that repeats waits twice as long each time, up to this factor
# The request that starts a load waits this long at most for placement's decision (see `Loader._placed`).
PLACEMENT_WAIT_S = 2.0


def cooldown(settings: Settings, error: LoadError) -> float:
    """How long a transient load failure stands as the model's answer before the next request tries again."""
    return settings.load_retry_cooldown_s * min(MAX_COOLDOWN_FACTOR, 2 ** (error.attempts - 1))


class Loader:
    """Loads models into the pool's slots; shares the pool's slots, placement, supervisor and evictor."""

    def __init__(self, settings: Settings, slots: dict[str, Slot], placement: Placement, supervisor: Supervisor,
                 evictor: Evictor) -> None:
        self.settings = settings
        self.slots = slots
        self.placement = placement
        self.supervisor = supervisor
        self.evictor = evictor
        # One load at a time per GPU: a worker measures its CUDA context as the GPU's free memory before and after
        # its load, which a neighbour loading beside it would distort.
        self._gpu_loads: dict[str, asyncio.Lock] = {}

    async def ensure(self, slot: Slot, wait_s: float | None, evict: bool) -> Worker:
        """The worker of a model that has none ready yet: starts a load if none runs, and waits up to `wait_s` for
        it; with `wait_s` None a cold model raises MODEL_LOADING at once. With `evict` False the load fails with
        RESOURCE_EXHAUSTED rather than evicting other models."""
        self.check_failed(slot)
        loading = slot.loading
        if loading is None:
            self._check_refused(slot, evict)
            self.start(slot, evict)
            loading = slot.loading
            assert loading is not None
            if await self._placed(slot, loading):
                return loading.result()  # it ended at once: refused for memory, or failed (or, fast, loaded)
        if wait_s is None or wait_s <= 0:
            raise SIEError(ErrorCode.MODEL_LOADING, f"model '{slot.key}' is loading; retry shortly")
        try:
            return await asyncio.wait_for(asyncio.shield(loading), wait_s)
        except TimeoutError:
            raise SIEError(ErrorCode.MODEL_LOADING, f"model '{slot.key}' is still loading after {wait_s:g}s") from None

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

    def check_failed(self, slot: Slot) -> None:
        """A model in its restart back-off answers 503 MODEL_LOADING (Retry-After the time left). Terminal answers
        (502, no Retry-After): a permanent load failure, or a transient one within its cooldown. After the cooldown
        the next request tries again, with no operator."""
        if slot.loading is None and slot.worker is None and self.supervisor.restarts.left(slot.key) > 0:
            raise self.supervisor.restarts.restarting(slot.key, "its last worker died or hung")
        error = slot.load_error
        if slot.state != ModelState.FAILED or error is None or slot.loading is not None:
            return
        if error.permanent or time.monotonic() - slot.failed_at < cooldown(self.settings, error):
            raise error.again(error.attempts)

    def _check_refused(self, slot: Slot, evict: bool) -> None:
        """A model whose last load was refused for memory answers that refusal, with Retry-After the time it still
        stands, and starts no load while it stands (`Refusal`)."""
        refusal = slot.refusal
        if refusal is None:
            return
        left = refusal.left(self.placement.ledger.freed, evict)
        if left <= 0:
            slot.refusal = None
            return
        raise SIEError(ErrorCode.RESOURCE_EXHAUSTED, refusal.error.message, retry_after=max(1, math.ceil(left)))

    def _refused(self, slot: Slot, error: SIEError, evict: bool) -> None:
        """Placement refused the model's load for memory: count it, and let the refusal stand (`Refusal`)."""
        metrics.MODEL_LOADS.labels(slot.key, "refused").inc()
        hold = self.settings.load_refusal_hold_s
        slot.refusal = Refusal(error, self.placement.ledger.freed, time.monotonic() + hold, evict)
        error.retry_after = max(1, math.ceil(hold))  # for the requests that waited on this load: when it may lift
        log.warning("not loading %s: %s", slot.key, error.message)

    def start(self, slot: Slot, evict: bool) -> None:
        """Start the slot's load as a task of its own (`slot.loading`), which the requests that want it wait on."""
        slot.placed.clear()
        slot.loading = asyncio.create_task(self._load(slot, evict), name=f"sie-load:{slot.key}")
        # Its failure is the slot's state and the answer of the requests that wait; nobody else reads it.
        slot.loading.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def _load(self, slot: Slot, evict: bool) -> Worker:
        slot.state, slot.load_started = ModelState.LOADING, time.monotonic()
        try:
            worker = await self.start_worker(slot, evict)
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

    def _evictable(self, evict: bool) -> Callable[[str], bool]:
        """Placement's test of which models it may evict for this load: none when the load may not evict."""
        return lambda key: evict and self.evictor.evictable(key)

    async def _evict_all(self, victims: list[str]) -> None:
        for victim in victims:
            await self.evictor.evict(victim, reason="memory")

    async def _fit(self, slot: Slot, device: str, evict: bool) -> None:
        """The estimate was low: evict LRU idle models until the measured figures fit the budget again, or, when
        none can go and the overrun is beyond the tolerance, stop this worker and fail the load (retryable)."""
        try:
            victims = self.placement.fit(slot.key, device, self._evictable(evict))
        except SIEError as exc:
            await self.evictor.evict(slot.key, reason="memory")
            self._refused(slot, exc, evict)
            raise
        await self._evict_all(victims)

    async def reserve(self, slot: Slot, nbytes: int, evict: bool) -> str:
        """Reserve `nbytes` on the device with the most free budget, evicting LRU idle models if needed."""
        self.placement.remeasure(loaded_workers(self.slots))
        device, victims = self.placement.plan(slot.key, nbytes, self._evictable(evict))
        await self._evict_all(victims)
        self.placement.reserve(slot.key, device, nbytes)
        return device

    async def start_worker(self, slot: Slot, evict: bool) -> Worker:
        """Find the weights, reserve memory, and spawn the model's worker; its Ready ends it."""
        cfg = slot.config
        folder, origin = await find_weights(self.settings, cfg)
        # Before the reservation: a refused setting fails here, holding nothing.
        options = family_options(self.settings, cfg)
        engine = getattr(options, "engine", DEFAULT_ENGINE)
        device = await self.reserve(slot, self.placement.estimate(slot.key, cfg, folder, engine), evict)
        slot.placed.set()
        spec = worker_spec(self.settings, self.placement.devices, self.supervisor.worker_endpoints, cfg, folder,
                           device, options)
        log.info("loading %s: %s adapter, weights from %s (%s), on %s", cfg.sie_id, spec.adapter, folder or "-",
                 origin, device)
        on_export = partial(self.reserve_export, slot, evict)
        if device == "cpu":
            return await self.supervisor.spawn(spec, slot.key, on_export)
        async with self._gpu_loads.setdefault(device, asyncio.Lock()):
            return await self.supervisor.spawn(spec, slot.key, on_export)

    async def reserve_export(self, slot: Slot, evict: bool) -> None:
        """The loading worker starts a graph export: reserve the helper's memory beside the worker's until its Ready,
        evicting LRU idle models if needed; RESOURCE_EXHAUSTED (the worker is then stopped) when it cannot fit."""
        extra, victims = self.placement.plan_export(slot.key, self._evictable(evict))
        if not extra:
            return  # its reservation has held the helper from the start (its last load exported and never got ready)
        await self._evict_all(victims)
        self.placement.grow(slot.key, extra)
        log.info("%s exports its graph first: %.0f MiB more reserved until it is ready", slot.key, extra / 2**20)
