"""Device memory readings (router process): NVML for GPUs (`nvidia-ml-py`, imported as `pynvml`), psutil for the host.

`NvmlDevices` takes the NVML module as an argument so tests can replay recorded answers. Each usable GPU, or each MIG
slice of a GPU in MIG mode, is one device, named `cuda:<n>` or `cuda:<n>/mig<k>` and pinned to a worker by its UUID.
Readings never raise after start: an NVML error keeps the device's last good reading and is logged once.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import psutil
import pynvml

from sie_worker.options import CPU_WORKER_ENV

log = logging.getLogger("sie.devices")


class NoDevice(RuntimeError):
    """`--device cuda` where no GPU can be used: the server cannot start."""


@dataclass(frozen=True)
class DeviceMemory:
    """One device's memory: `name` is `cuda:<index>`, `cuda:<index>/mig<slice>` or `cpu`.

    `uuid` is what a worker's CUDA_VISIBLE_DEVICES names it by (`GPU-…` or `MIG-…`); `exclusive` is true for a GPU in
    exclusive-process compute mode, where a second process cannot create a context."""

    name: str
    index: int | None
    total: int
    used: int
    free: int = 0
    uuid: str = ""
    exclusive: bool = False


class Devices(Protocol):
    def snapshot(self) -> list[DeviceMemory]: ...

    def process_memory(self, pid: int, device: str, reported: int = 0, context_bytes: int = 0) -> int | None: ...

    def cuda_visible(self, device: str) -> str: ...


# What a GPU worker's process gets unless the server's environment says otherwise. Lazy module loading: CUDA loads a
# kernel image when it is first launched instead of every kernel of libtorch, cuBLAS and cuDNN at context creation,
# hundreds of MiB of VRAM per worker process. Expandable segments: the caching allocator grows mapped segments instead
# of caching a block per size, so what a worker reserves stays close to what it uses (what the ledger accounts).
GPU_WORKER_ENV = {"CUDA_MODULE_LOADING": "LAZY", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


def worker_env(device: str, environ: Mapping[str, str]) -> dict[str, str]:
    """GPU_WORKER_ENV or the worker's own CPU_WORKER_ENV (sie_worker.options), by `device`, less what `environ` (the
    server's environment, which workers inherit) already sets."""
    defaults = CPU_WORKER_ENV if device == "cpu" else GPU_WORKER_ENV
    return {name: value for name, value in defaults.items() if name not in environ}


def budgets(readings: list[DeviceMemory], gpu_fraction: float, cpu_budget: int) -> dict[str, int]:
    """Bytes workers may hold per device: on a GPU min(total x fraction, free now), so memory another process
    already holds is never promised; on the host `cpu_budget`, else 80% of RAM."""
    found = {}
    for device in readings:
        if device.name == "cpu":
            found["cpu"] = cpu_budget or int(device.total * 0.8)
        else:
            found[device.name] = min(int(device.total * gpu_fraction), device.free)
    return found


def visible_filter(value: str | None, gpus: list[tuple[str, int, tuple[str, ...]]]) -> set[str] | None:
    """The device names the server's own CUDA_VISIBLE_DEVICES allows; None when it is unset (every GPU).

    `gpus` is [(name, NVML index of the GPU, its UUIDs)]: a MIG slice carries its own `MIG-…` UUID and its GPU's.
    Entries are indices (in PCI bus order, as NVML numbers GPUs: run with CUDA_DEVICE_ORDER=PCI_BUS_ID so that CUDA
    agrees) or UUIDs and UUID prefixes; as CUDA does, the list ends at the first entry that names no GPU. An empty
    value hides every GPU."""
    if value is None:
        return None
    allowed: set[str] = set()
    for entry in (e.strip() for e in value.split(",")):
        matches = {name for name, index, uuids in gpus
                   if (entry.isdigit() and index == int(entry)) or
                   (entry and not entry.isdigit() and any(u.startswith(entry) for u in uuids))}
        if not matches:
            if entry:
                log.warning("CUDA_VISIBLE_DEVICES entry %r names no GPU here; the entries after it are ignored", entry)
            break
        allowed |= matches
    return allowed


@dataclass
class _Gpu:
    """A device as opened: its NVML handle (a GPU's, or a MIG slice's) and its last good reading."""

    handle: Any
    reading: DeviceMemory
    visible_uuid: str  # the UUID the worker's CUDA_VISIBLE_DEVICES gets (a slice's MIG-… uuid)
    gpu_uuid: str  # the physical GPU's, the same for every slice of it


class NvmlDevices:
    """GPUs (or their MIG slices) as NVML reports them; memory per worker attributed by PID."""

    def __init__(self, nvml: Any = pynvml, visible: str | None = None) -> None:
        self.nvml = nvml
        self._logged: set[tuple[str, str]] = set()
        nvml.nvmlInit()
        opened: list[_Gpu] = []
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                opened.extend(self._open(index))
            except nvml.NVMLError as exc:  # one GPU that cannot be opened must not cost the others
                log.warning("skipping GPU %d: NVML cannot open it (%s)", index, exc)
        allowed = visible_filter(visible, [(g.reading.name, g.reading.index or 0, (g.visible_uuid, g.gpu_uuid))
                                           for g in opened])
        self.gpus = {g.reading.name: g for g in opened if allowed is None or g.reading.name in allowed}
        if not self.gpus:
            raise NoDevice("NVML found no usable GPU" + ("" if visible is None else
                                                          f" among CUDA_VISIBLE_DEVICES={visible!r}"))
        for gpu in self.gpus.values():  # so that an operator sees which card each name is
            r = gpu.reading
            log.info("%s: %s, %.1f GiB, %.1f GiB free%s", r.name, r.uuid, r.total / 2**30, r.free / 2**30,
                     ", exclusive-process mode (one worker)" if r.exclusive else "")

    def _open(self, index: int) -> list[_Gpu]:
        nvml = self.nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        exclusive = self._exclusive(handle)
        gpu_uuid = str(nvml.nvmlDeviceGetUUID(handle))
        if self._mig_enabled(handle):
            slices = []
            for k in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
                try:
                    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, k)
                except nvml.NVMLError_NotFound:  # an empty slot: no GPU instance was created there
                    continue
                slices.append(self._read_new(mig, f"cuda:{index}/mig{k}", index, exclusive, gpu_uuid))
            return slices
        return [self._read_new(handle, f"cuda:{index}", index, exclusive, gpu_uuid)]

    def _read_new(self, handle: Any, name: str, index: int, exclusive: bool, gpu_uuid: str) -> _Gpu:
        uuid = str(self.nvml.nvmlDeviceGetUUID(handle))
        reading = self._reading(handle, DeviceMemory(name, index, 0, 0, uuid=uuid, exclusive=exclusive))
        return _Gpu(handle, reading, uuid, gpu_uuid)

    def _mig_enabled(self, handle: Any) -> bool:
        try:
            current, _pending = self.nvml.nvmlDeviceGetMigMode(handle)
        except self.nvml.NVMLError:  # NotSupported on GPUs without MIG
            return False
        return bool(current == self.nvml.NVML_DEVICE_MIG_ENABLE)

    def _exclusive(self, handle: Any) -> bool:
        try:
            return bool(self.nvml.nvmlDeviceGetComputeMode(handle) == self.nvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS)
        except self.nvml.NVMLError:
            return False

    def _reading(self, handle: Any, last: DeviceMemory) -> DeviceMemory:
        info = self.nvml.nvmlDeviceGetMemoryInfo(handle)
        return replace(last, total=int(info.total), used=int(info.used), free=int(info.free))

    def _log_once(self, device: str, exc: BaseException) -> None:
        key = (device, type(exc).__name__)
        if key not in self._logged:
            self._logged.add(key)
            log.warning("NVML cannot read %s (%s); keeping its last good reading", device, exc)

    def snapshot(self) -> list[DeviceMemory]:
        for name, gpu in self.gpus.items():
            try:
                gpu.reading = self._reading(gpu.handle, gpu.reading)
            except self.nvml.NVMLError as exc:  # GPU lost, NotSupported under vGPU: answer with what we had
                self._log_once(name, exc)
        return [gpu.reading for gpu in self.gpus.values()]

    def process_memory(self, pid: int, device: str, reported: int = 0, context_bytes: int = 0) -> int | None:
        """NVML's figure for the process, which includes its CUDA context. Where NVML has none (a container without the
        host's PID namespace sees other PIDs; newer drivers there report 0 bytes), the worker's own figure plus the
        context it measured at start; None if it reported nothing either."""
        gpu = self.gpus.get(device)
        try:
            processes = self.nvml.nvmlDeviceGetComputeRunningProcesses(gpu.handle) if gpu else []
        except self.nvml.NVMLError as exc:  # NoPermission under MIG, a lost GPU
            self._log_once(device, exc)
            processes = []
        for process in processes:
            if process.pid == pid and process.usedGpuMemory:
                return int(process.usedGpuMemory)
        return reported + context_bytes if reported else None

    def cuda_visible(self, device: str) -> str:
        """The worker's CUDA_VISIBLE_DEVICES: the device's UUID, so it sees that GPU, as cuda:0, whatever the order. A
        CPU worker on a GPU host sees none."""
        return "" if device == "cpu" else self.gpus[device].visible_uuid


class HostMemory:
    """The CPU fallback: host RAM, and each worker's resident set size."""

    def snapshot(self) -> list[DeviceMemory]:
        memory = psutil.virtual_memory()
        return [DeviceMemory("cpu", None, int(memory.total), int(memory.total - memory.available),
                             free=int(memory.available))]

    def process_memory(self, pid: int, device: str, reported: int = 0, context_bytes: int = 0) -> int | None:
        try:
            return int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            return None

    def cuda_visible(self, device: str) -> str:
        return ""  # hides every GPU from a CPU worker


CGROUP = Path("/sys/fs/cgroup")


def available_cpus(cgroup: Path = CGROUP) -> int:
    """CPUs this process may run on: its affinity, capped by the cgroup's CPU quota (a container's CPU limit, rounded
    up), so that a worker in a 4-CPU pod on a 64-core node does not start 64 threads."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup)
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def cgroup_cpu_quota(cgroup: Path = CGROUP) -> float | None:
    """The CPU quota in CPUs: cgroup v2's `cpu.max` ("400000 100000"; "max" is none), else v1's cfs quota over its
    period (-1 is none); None without a quota or a cgroup filesystem."""
    try:
        quota, _, period = (cgroup / "cpu.max").read_text().partition(" ")
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for folder in (cgroup / "cpu", cgroup / "cpu,cpuacct"):
        try:
            quota_us = int((folder / "cpu.cfs_quota_us").read_text())
            period_us = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    return None


def detect(device: str, visible: str | None = None, nvml: Any = pynvml) -> Devices:
    """NVML when GPUs are wanted and usable; the host otherwise. `--device cuda` without a usable GPU raises NoDevice.

    `visible` is the server's own CUDA_VISIBLE_DEVICES: placement keeps to the GPUs it names."""
    if device == "cpu":
        return HostMemory()
    try:
        return NvmlDevices(nvml, visible)
    except (nvml.NVMLError, NoDevice) as exc:
        if device == "cuda":
            raise NoDevice(f"--device cuda was given, but no GPU can be used here ({exc})") from None
        log.info("no usable GPU (%s); workers run on the CPU", exc)
        return HostMemory()
