"""Placement (router process): where a model's worker runs and how much memory it is accounted.

It owns the memory ledger and the device readings: a model's estimate before its worker spawns, the measured figure
once it is ready, reservations that follow a worker's growth, and the plan of least-recently-used victims when a new
model does not fit.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from pathlib import Path

from sie_router.errors import SIEError
from sie_router.models.config import ModelConfig
from sie_router.pool.devices import Devices, HostMemory, budgets
from sie_router.pool.ledger import MemoryLedger
from sie_router.settings import Settings
from sie_sdk.codes import ErrorCode

# Estimate for a model whose config gives none: a per-process base, plus its weight files times this factor (the
# weights and a working set of half their size).
WEIGHTS_MEMORY_FACTOR = 1.5
# The base before any worker on a device has measured itself. On the CPU, a torch worker process that has imported
# its libraries (sie_worker, torch, transformers) holds 405 MiB RSS before any weights (measured, issue 14); a lean
# dense worker (OpenVINO, no torch) about 60 MiB, learned from its first worker. On a GPU, the CUDA context and the
# caching allocator's first blocks: not measured here, so generous.
DEFAULT_BASE = {"cpu": 400 * 2**20}
DEFAULT_GPU_BASE = 768 * 2**20
# Measured memory may pass the budget by this fraction when nothing can be evicted; beyond it the load fails.
OVERRUN_TOLERANCE = 0.05


class Placement:
    def __init__(self, settings: Settings, devices: Devices) -> None:
        self.settings = settings
        self.devices = devices
        # GPUs are budgeted by min(total x fraction, free at start); exclusive-process GPUs take one worker.
        readings = devices.snapshot()
        limits = budgets(readings, settings.gpu_memory_fraction, settings.memory_budget)
        # Beside GPUs, the host holds the workers that fell back to the CPU (--device auto with a torch without CUDA),
        # so their host memory is never charged to a GPU's budget; no model is placed there.
        fallback = set() if "cpu" in limits else {"cpu"}
        if fallback:
            host = HostMemory().snapshot()
            limits["cpu"] = budgets(host, settings.gpu_memory_fraction, settings.memory_budget)["cpu"]
        self.ledger = MemoryLedger(limits, exclusive={d.name for d in readings if d.exclusive}, fallback_only=fallback)
        self.weights: dict[str, int] = {}  # model key -> bytes of its weight files, for learning the base
        self.bases: dict[str, dict[str, int]] = {}  # device -> model key -> what its worker holds beyond its weights
        self.measured: dict[str, int] = {}  # model key -> what its last worker held at Ready
        # model key -> adapter family: on the CPU a dense worker runs without torch and costs a fraction of the others
        self.families: dict[str, str] = {}

    @property
    def has_gpus(self) -> bool:
        """Whether models are placed on GPUs here."""
        return any(d.placeable and name != "cpu" for name, d in self.ledger.devices.items())

    def estimate(self, key: str, config: ModelConfig, folder: str) -> int:
        """Bytes to reserve before the worker has measured itself: the config's figure, else what the model's last
        worker measured, else the per-process base of the device with the most room plus the weights and their
        working set."""
        if config.memory_mb:
            return config.memory_mb * 2**20
        weights = sum(p.stat().st_size for p in Path(folder).rglob("*")
                      if p.suffix in (".safetensors", ".bin", ".pt")) if folder else 0
        self.weights[key] = weights
        self.families[key] = config.family()
        if key in self.measured:
            return self.measured[key]
        return self.base(self.ledger.best_device(), config.family()) + int(weights * WEIGHTS_MEMORY_FACTOR)

    def base(self, device: str, family: str | None = None) -> int:
        """What a worker on `device` holds beyond its weights and working set: the median over the workers of the same
        family measured there, else over all workers measured there (one odd model neither hides nor inflates it),
        else a default."""
        learned = self.bases.get(device) or {}
        same = [base for key, base in learned.items() if self.families.get(key) == family]
        if same or learned:
            return int(statistics.median(same or learned.values()))
        return DEFAULT_BASE.get(device, DEFAULT_GPU_BASE)

    def overrun(self, device: str) -> int:
        """Bytes by which the reservations on `device` (measured figures once workers are ready) pass its budget."""
        return max(0, -self.ledger.devices[device].free)

    def fit(self, key: str, device: str, evictable: Callable[[str], bool]) -> list[str]:
        """After `key`'s worker measured itself: the LRU models to evict so `device` is back within budget; none
        when it is, or when nothing can be evicted and the overrun is within the tolerance. 503 RESOURCE_EXHAUSTED
        when nothing can be evicted and the overrun is beyond it."""
        over = self.overrun(device)
        if not over:
            return []
        victims = self.ledger.eviction_plan(device, 0, lambda k: k != key and evictable(k))
        if victims is not None:
            return victims
        budget = self.ledger.devices[device].budget
        if over <= budget * OVERRUN_TOLERANCE:
            return []
        for learned in self.bases.values():  # a worker too big to keep must not make every other estimate too big
            learned.pop(key, None)
        held = (self.ledger.reserved(key) or 0) / 2**20
        raise SIEError(ErrorCode.RESOURCE_EXHAUSTED,
                       f"model '{key}' holds {held:.0f} MiB on {device}, {over / 2**20:.0f} MiB "
                       f"over its budget of {budget / 2**20:.0f} MiB, and no idle model can be evicted")

    def plan(self, key: str, nbytes: int, evictable: Callable[[str], bool]) -> tuple[str, list[str]]:
        """The device with the most free budget and the LRU models to evict there so `nbytes` fit;
        503 RESOURCE_EXHAUSTED (retryable) when no such plan exists."""
        for reading in self.devices.snapshot():  # what other processes took since start shrinks a GPU's budget
            if reading.name != "cpu":
                self.ledger.observe_free(reading.name, reading.free)
        device = self.ledger.best_device()
        victims = self.ledger.eviction_plan(device, nbytes, lambda k: k != key and evictable(k))
        if victims is None:
            free = self.ledger.devices[device].free
            raise SIEError(ErrorCode.RESOURCE_EXHAUSTED,
                           f"model '{key}' needs about {nbytes / 2**20:.0f} MiB on {device}, "
                           f"{free / 2**20:.0f} MiB is free and no idle model can be evicted")
        return device, victims

    def reserve(self, key: str, device: str, nbytes: int) -> None:
        self.ledger.reserve(key, device, nbytes)

    def settle(self, key: str, pid: int, device: str, reported: int, context_bytes: int = 0) -> int:
        """Replace the estimate with what the worker holds: the device's per-process reading, else the worker's own
        figure plus its measured CUDA context (NVML cannot attribute by PID inside a container without hostPID)."""
        measured = self.devices.process_memory(pid, device, reported, context_bytes) or reported
        self.ledger.settle(key, measured)
        self.ledger.touch(key)  # idle time counts from readiness, not from the reservation before the spawn
        self.measured[key] = measured
        if key in self.weights:  # a model whose estimate came from its weights teaches the device's base
            self.bases.setdefault(device, {})[key] = max(0, measured - int(self.weights[key] * WEIGHTS_MEMORY_FACTOR))
        return measured

    def remeasure(self, loaded: Iterable[tuple[str, int, str, int, int]]) -> None:
        """Raise each loaded model's reservation to what its worker holds now, if more. Each entry is (key, worker
        pid, device, the worker's own figure at Ready, its CUDA context bytes).

        The figure taken at Ready is not a ceiling: the torch engine's allocator and oneDNN caches grow with the batch
        shapes traffic brings (all-MiniLM-L6-v2 in bf16: 530 MiB at Ready, 890 under the soak's mix, then flat).
        Eviction plans and the memory metrics must see the grown figure, or the budget is overrun. Reservations only
        rise: memory a worker gave back it can take again."""
        for key, pid, device, reported, context_bytes in loaded:
            measured = self.devices.process_memory(pid, device, reported, context_bytes)
            reserved = self.ledger.reserved(key)
            if measured and reserved is not None and measured > reserved:
                self.ledger.settle(key, measured)

    def move(self, key: str, device: str) -> None:
        """The worker runs elsewhere than it was placed (a GPU placement that fell back to the CPU): its reservation
        follows it to the host's budget, so the GPU's budget is not charged for host memory."""
        nbytes = self.ledger.reserved(key)
        if nbytes is not None:
            self.ledger.reserve(key, device, nbytes)

    def release(self, key: str) -> None:
        self.ledger.release(key)  # its base sample stays: it still tells what a worker there costs

    def touch(self, key: str) -> None:
        self.ledger.touch(key)

    def last_used(self, key: str) -> float | None:
        return self.ledger.last_used(key)
