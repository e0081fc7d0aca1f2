"""Placement (router process): where a model's worker runs and how much memory it is accounted.

It owns the memory ledger and the device readings: a model's estimate before its worker spawns, the measured figure
once it is ready, reservations that follow a worker's growth, and the plan of least-recently-used victims when a new
model does not fit.
"""

from __future__ import annotations

import functools
import importlib.util
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from sie_router.errors import SIEError
from sie_router.models.config import ModelConfig
from sie_router.pool.devices import Devices, HostMemory, budgets
from sie_router.pool.ledger import MemoryLedger
from sie_router.settings import Settings
from sie_sdk.codes import ErrorCode
from sie_worker.options import DEFAULT_ENGINE, EXPORT_HELPER_BASE_BYTES, EXPORT_HELPER_WEIGHTS_FACTOR, LEAN_FAMILIES

# Estimate for a model whose config gives none: a per-process base, plus its weight files times a factor (the weights
# and a working set). The base before any worker of the same engine on a device has measured itself (RSS on the CPU):
# a torch worker that has imported its libraries (sie_worker, torch, transformers) holds 405 MiB before any weights
# (measured, issue 14), and its working set is half its weights. A lean worker (no torch: OpenVINO or ONNX Runtime)
# holds 120 MiB at Ready for a tiny dense checkpoint (2 layers, 32 wide, 0.13 MB of weights; measured here on
# 2026-12-06) and 273-276 MiB for MiniLM (87 MiB of weights; bench/README.md, "lean workers"): 120 MiB plus 1.75
# times the weights, with 4 MiB to spare. On a GPU, the CUDA context and the caching allocator's first blocks: not
# measured here, so generous.
WEIGHTS_MEMORY_FACTOR = 1.5
DEFAULT_BASE = {"cpu": 400 * 2**20}
LEAN_CPU_BASE = 124 * 2**20
LEAN_WEIGHTS_FACTOR = 1.75
DEFAULT_GPU_BASE = 768 * 2**20
# A lean worker's first load of a checkpoint exports its graph in a helper process that imports torch, transformers
# and the exporters; its memory (options.EXPORT_HELPER_*, measured there) is reserved beside the worker's own estimate
# from the worker's `ExportStarting` until its `Ready` (which also covers a fallback to torch when the export fails).
# Engines that serve a lean worker's graph, as `Ready.engine` names them.
LEAN_ENGINES = frozenset({"onnx", "openvino"})
# Measured memory may pass the budget by this fraction when nothing can be evicted; beyond it the load fails.
OVERRUN_TOLERANCE = 0.05


class WorkerKind(NamedTuple):
    """What decides a worker's base: its family and its engine, "lean" (an exported graph, no torch) or "torch"."""

    family: str
    engine: str


@functools.cache
def graph_runtime_installed() -> bool:
    """Whether a lean worker's runtime (OpenVINO or ONNX Runtime) is installed; workers run this Python."""
    return any(importlib.util.find_spec(name) is not None for name in ("openvino", "onnxruntime"))


def engine_kind(device: str, family: str, engine: str) -> str:
    """"lean" where a worker of `family` on `device` will serve an exported graph without torch (as
    `sie_worker.adapters.build_adapter` decides), else "torch". A checkpoint the worker then serves with torch
    anyway (custom code, an export that fails) is caught once it measures itself."""
    lean = device == "cpu" and family in LEAN_FAMILIES and engine != "torch" and graph_runtime_installed()
    return "lean" if lean else "torch"


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
        # model key -> its kind of worker: on the CPU a lean worker runs without torch and costs a fraction of a
        # torch one, so each kind's base is learned from its own
        self.kinds: dict[str, WorkerKind] = {}
        # Models whose worker said it exports its graph and has not been ready since: their next estimate includes the
        # helper, so a load that cannot fit it is refused before it spawns; and the models whose reservation does.
        self.exporting: set[str] = set()
        self.with_export: set[str] = set()

    @property
    def has_gpus(self) -> bool:
        """Whether models are placed on GPUs here."""
        return any(d.placeable and name != "cpu" for name, d in self.ledger.devices.items())

    def estimate(self, key: str, config: ModelConfig, folder: str, engine: str = DEFAULT_ENGINE) -> int:
        """Bytes to reserve before the worker has measured itself: the config's figure, else what the model's last
        worker measured, else the per-process base of its kind of worker (family and engine) on the device with the
        most room, plus the weights and their working set. `engine` is the family's engine option. A model whose last
        worker started a graph export and never got ready needs the export helper beside it again."""
        nbytes = self._worker_estimate(key, config, folder, engine)
        if key not in self.exporting:
            self.with_export.discard(key)
            return nbytes
        self.with_export.add(key)
        return nbytes + self.export_estimate(key)

    def _worker_estimate(self, key: str, config: ModelConfig, folder: str, engine: str) -> int:
        if config.memory_mb:
            return config.memory_mb * 2**20
        weights = sum(p.stat().st_size for p in Path(folder).rglob("*")
                      if p.suffix in (".safetensors", ".bin", ".pt")) if folder else 0
        self.weights[key] = weights
        device = self.ledger.best_device()
        self.kinds[key] = WorkerKind(config.family(), engine_kind(device, config.family(), engine))
        if key in self.measured:
            return self.measured[key]
        return self.base(device, self.kinds[key]) + self.working_set(key)

    def base(self, device: str, kind: WorkerKind | None = None) -> int:
        """What a worker on `device` holds beyond its weights and working set: the median over the workers of the same
        kind measured there, else over those of the same engine (one odd model neither hides nor inflates it), else
        the engine's default."""
        learned = self.bases.get(device) or {}
        engine = kind.engine if kind else "torch"
        same = [base for key, base in learned.items() if self.kinds.get(key) == kind]
        alike = [base for key, base in learned.items() if (k := self.kinds.get(key)) and k.engine == engine]
        if same or alike:
            return int(statistics.median(same or alike))
        if device != "cpu":
            return DEFAULT_GPU_BASE
        return LEAN_CPU_BASE if engine == "lean" else DEFAULT_BASE["cpu"]

    def working_set(self, key: str) -> int:
        """Bytes a model's worker holds for its weights: theirs and a working set, by its kind of worker."""
        kind = self.kinds.get(key)
        factor = LEAN_WEIGHTS_FACTOR if kind is not None and kind.engine == "lean" else WEIGHTS_MEMORY_FACTOR
        return int(self.weights.get(key, 0) * factor)

    def export_estimate(self, key: str) -> int:
        """Bytes a graph-export helper holds while it exports the model's checkpoint."""
        return EXPORT_HELPER_BASE_BYTES + int(self.weights.get(key, 0) * EXPORT_HELPER_WEIGHTS_FACTOR)

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
            with_export = " with the export of its graph" if key in self.with_export else ""
            raise SIEError(ErrorCode.RESOURCE_EXHAUSTED,
                           f"model '{key}' needs about {nbytes / 2**20:.0f} MiB{with_export} on {device}, "
                           f"{free / 2**20:.0f} MiB is free and no idle model can be evicted")
        return device, victims

    def reserve(self, key: str, device: str, nbytes: int) -> None:
        self.ledger.reserve(key, device, nbytes)

    def plan_export(self, key: str, evictable: Callable[[str], bool]) -> tuple[int, list[str]]:
        """While `key`'s worker loads: the bytes its graph-export helper needs beside its reservation, and the LRU
        models to evict on its device so they fit; 503 RESOURCE_EXHAUSTED (retryable) when no such plan exists."""
        if key in self.with_export:
            return 0, []
        self.exporting.add(key)
        device, extra = self.ledger.placement[key], self.export_estimate(key)
        victims = self.ledger.eviction_plan(device, extra, lambda k: k != key and evictable(k))
        if victims is None:
            free = self.ledger.devices[device].free
            raise SIEError(ErrorCode.RESOURCE_EXHAUSTED,
                           f"model '{key}' is loaded for the first time: exporting its graph needs about "
                           f"{extra / 2**20:.0f} MiB more on {device}, {free / 2**20:.0f} MiB is free and no idle "
                           "model can be evicted")
        return extra, victims

    def grow(self, key: str, nbytes: int) -> None:
        """Add `nbytes` to a model's reservation (an export helper's memory, until the worker measures itself)."""
        held = self.ledger.reserved(key)
        if held is not None:
            self.ledger.settle(key, held + nbytes)

    def settle(self, key: str, pid: int, device: str, reported: int, context_bytes: int = 0,
               engine: str | None = None) -> int:
        """Replace the estimate (and any export helper's reservation) with what the worker holds: the device's
        per-process reading, else the worker's own figure plus its measured CUDA context (NVML cannot attribute by PID
        inside a container without hostPID). `engine` is the one the worker runs (`Ready.engine`): a lean family
        that fell back to torch teaches torch's base."""
        measured = self.devices.process_memory(pid, device, reported, context_bytes) or reported
        self.ledger.settle(key, measured)
        self.exporting.discard(key)  # its graph is cached now
        self.with_export.discard(key)
        kind = self.kinds.get(key)
        if kind is not None and engine in LEAN_ENGINES | {"torch"}:
            self.kinds[key] = WorkerKind(kind.family, "lean" if engine in LEAN_ENGINES else "torch")
        self.ledger.touch(key)  # idle time counts from readiness, not from the reservation before the spawn
        self.measured[key] = measured
        if key in self.weights:  # a model whose estimate came from its weights teaches the device's base
            self.bases.setdefault(device, {})[key] = max(0, measured - self.working_set(key))
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
        self.with_export.discard(key)
        self.ledger.release(key)  # its base sample stays: it still tells what a worker there costs

    def touch(self, key: str) -> None:
        self.ledger.touch(key)

    def last_used(self, key: str) -> float | None:
        return self.ledger.last_used(key)
