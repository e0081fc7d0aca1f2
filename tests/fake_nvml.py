"""A fake `pynvml` module for the router's device tests: the function names, argument order and return types of
nvidia-ml-py 13.x, built from its own ctypes structs and error classes, replaying a described set of GPUs.

The figures are an H100 80GB HBM3's (81559 MiB total, 522 MiB used with no process) and an A100 80GB split into MIG
slices. Processes carry `usedGpuMemory` None where NVML answers NVML_VALUE_NOT_AVAILABLE, as pynvml converts it.
Errors can be injected per function and device, mid-run (`fail`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pynvml

MiB = 2**20
H100_TOTAL = 81559 * MiB
H100_IDLE_USED = 522 * MiB


@dataclass
class FakeGpu:
    """One GPU (or one MIG slice). `mig` None: the GPU does not support MIG (NVML raises NotSupported)."""

    uuid: str
    total: int = H100_TOTAL
    used: int = H100_IDLE_USED
    processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, usedGpuMemory)
    compute_mode: int = pynvml.NVML_COMPUTEMODE_DEFAULT
    mig: list[FakeGpu | None] | None = None  # MIG slots, None where no GPU instance exists; [] is MIG disabled
    fail: dict[str, pynvml.NVMLError] = field(default_factory=dict)  # function name -> error it raises now


class _Handle:
    """Stands in for `c_nvmlDevice_t`, an opaque pointer."""

    def __init__(self, gpu: FakeGpu) -> None:
        self.gpu = gpu


class FakeNvml:
    """The subset of the `pynvml` module that router/pool/devices.py calls."""

    def __init__(self, gpus: list[FakeGpu], init_error: pynvml.NVMLError | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        for name in dir(pynvml):  # the real error classes and constants, by their real names
            if name.startswith(("NVMLError", "NVML_")):
                setattr(self, name, getattr(pynvml, name))

    @staticmethod
    def _check(gpu: FakeGpu, function: str) -> None:
        if function in gpu.fail:
            raise gpu.fail[function]

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        if index >= len(self.gpus):
            raise pynvml.NVMLError_InvalidArgument()
        gpu = self.gpus[index]
        self._check(gpu, "nvmlDeviceGetHandleByIndex")
        return _Handle(gpu)

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        self._check(handle.gpu, "nvmlDeviceGetUUID")
        return handle.gpu.uuid

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle, version: Any = None) -> pynvml.c_nvmlMemory_t:
        gpu = handle.gpu
        self._check(gpu, "nvmlDeviceGetMemoryInfo")
        return pynvml.c_nvmlMemory_t(total=gpu.total, free=gpu.total - gpu.used, used=gpu.used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: _Handle) -> list[Any]:
        self._check(handle.gpu, "nvmlDeviceGetComputeRunningProcesses")
        found = []
        for pid, used in handle.gpu.processes:
            info = pynvml.c_nvmlProcessInfo_v3_t(pid=pid, usedGpuMemory=pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value
                                                 if used is None else used,
                                                 gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)
            obj = pynvml.nvmlStructToFriendlyObject(info)
            if obj.usedGpuMemory == pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value:
                obj.usedGpuMemory = None  # what pynvml itself does with NVML_VALUE_NOT_AVAILABLE
            found.append(obj)
        return found

    def nvmlDeviceGetComputeMode(self, handle: _Handle) -> int:
        self._check(handle.gpu, "nvmlDeviceGetComputeMode")
        return handle.gpu.compute_mode

    def nvmlDeviceGetMigMode(self, device: _Handle) -> list[int]:
        if device.gpu.mig is None:
            raise pynvml.NVMLError_NotSupported()
        mode = pynvml.NVML_DEVICE_MIG_ENABLE if device.gpu.mig else pynvml.NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, device: _Handle) -> int:
        return len(device.gpu.mig or [])

    def nvmlDeviceGetMigDeviceHandleByIndex(self, device: _Handle, index: int) -> _Handle:
        slot = (device.gpu.mig or [])[index]
        if slot is None:
            raise pynvml.NVMLError_NotFound()
        return _Handle(slot)
