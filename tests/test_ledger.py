"""The memory ledger, and NVML readings replayed from recorded answers (no GPU needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pynvml
import pytest

from sie_router.devices import HostMemory, NvmlDevices, detect
from sie_router.ledger import MemoryLedger

MiB = 2**20


def test_reserve_settle_release_and_best_device() -> None:
    ledger = MemoryLedger({"cuda:0": 1000 * MiB, "cuda:1": 800 * MiB})
    ledger.reserve("a", ledger.best_device(), 300 * MiB)
    assert ledger.placement["a"] == "cuda:0"
    assert ledger.best_device() == "cuda:1"  # 800 free beats 700
    ledger.settle("a", 250 * MiB)
    assert ledger.devices["cuda:0"].free == 750 * MiB
    ledger.release("a")
    assert ledger.devices["cuda:0"].free == 1000 * MiB and "a" not in ledger.recency


def test_eviction_plan_takes_least_recently_used_evictable_models_on_that_device() -> None:
    ledger = MemoryLedger({"cpu": 1000 * MiB})
    for key in ("old", "pinned", "mid", "new"):
        ledger.reserve(key, "cpu", 250 * MiB)
    ledger.touch("old")  # now old is most recent; LRU order: pinned, mid, new, old
    plan = ledger.eviction_plan("cpu", 400 * MiB, lambda k: k != "pinned")
    assert plan == ["mid", "new"]
    assert ledger.eviction_plan("cpu", 2000 * MiB, lambda k: True) is None
    assert ledger.eviction_plan("cpu", 0, lambda k: True) == []


class RecordedNvml:
    """Answers recorded from an 80 GiB H100 with two compute processes."""

    NVMLError = pynvml.NVMLError

    def __init__(self) -> None:
        self.initialised = False

    def nvmlInit(self) -> None:
        self.initialised = True

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"handle{index}"

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> SimpleNamespace:
        return SimpleNamespace(total=85520809984, free=83293437952, used=2227372032)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=4242, usedGpuMemory=1073741824), SimpleNamespace(pid=4343, usedGpuMemory=None)]


def test_nvml_readings_and_per_pid_attribution() -> None:
    devices = NvmlDevices(RecordedNvml())
    (gpu,) = devices.snapshot()
    assert (gpu.name, gpu.total, gpu.used) == ("cuda:0", 85520809984, 2227372032)
    assert devices.process_memory(4242, "cuda:0") == 2**30
    assert devices.process_memory(4343, "cuda:0") is None  # NVML may not know (no permission)
    assert devices.process_memory(1, "cuda:0") is None


def test_without_a_gpu_auto_falls_back_to_host_memory_and_cuda_is_an_error() -> None:
    class NoLibrary(RecordedNvml):
        def nvmlInit(self) -> None:
            raise pynvml.NVMLError_LibraryNotFound()

    assert isinstance(detect("auto", NoLibrary()), HostMemory)
    with pytest.raises(RuntimeError, match="NVML"):
        detect("cuda", NoLibrary())
    host = HostMemory().snapshot()[0]
    assert host.name == "cpu" and 0 < host.used < host.total
