"""Device memory readings (router process): NVML for GPUs (`nvidia-ml-py`, imported as `pynvml`), psutil for the host.

`NvmlDevices` takes the NVML module as an argument so tests can replay recorded answers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import psutil
import pynvml

log = logging.getLogger("sie.devices")


@dataclass(frozen=True)
class DeviceMemory:
    """One device's memory: `name` is `cuda:<index>` or `cpu`."""

    name: str
    index: int | None
    total: int
    used: int


class Devices(Protocol):
    def snapshot(self) -> list[DeviceMemory]: ...

    def process_memory(self, pid: int, device: str) -> int | None: ...


class NvmlDevices:
    """GPUs as NVML reports them; memory per worker attributed by PID."""

    def __init__(self, nvml: Any = pynvml) -> None:
        self.nvml = nvml
        nvml.nvmlInit()
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        if not self.handles:
            raise RuntimeError("NVML found no GPU")

    def snapshot(self) -> list[DeviceMemory]:
        found = []
        for index, handle in enumerate(self.handles):
            info = self.nvml.nvmlDeviceGetMemoryInfo(handle)
            found.append(DeviceMemory(f"cuda:{index}", index, int(info.total), int(info.used)))
        return found

    def process_memory(self, pid: int, device: str) -> int | None:
        handle = self.handles[int(device.split(":")[1])]
        for process in self.nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if process.pid == pid and process.usedGpuMemory is not None:
                return int(process.usedGpuMemory)
        return None


class HostMemory:
    """The CPU fallback: host RAM, and each worker's resident set size."""

    def snapshot(self) -> list[DeviceMemory]:
        memory = psutil.virtual_memory()
        return [DeviceMemory("cpu", None, int(memory.total), int(memory.total - memory.available))]

    def process_memory(self, pid: int, device: str) -> int | None:
        try:
            return int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            return None


def detect(device: str, nvml: Any = pynvml) -> Devices:
    """NVML when GPUs are wanted and present; the host otherwise. `--device cuda` without a GPU is an error."""
    if device == "cpu":
        return HostMemory()
    try:
        return NvmlDevices(nvml)
    except (nvml.NVMLError, RuntimeError) as exc:
        if device == "cuda":
            raise RuntimeError(f"--device cuda, but NVML is unusable: {exc}") from exc
        log.info("no usable GPU (%s); workers run on the CPU", exc)
        return HostMemory()
