"""GPU placement without a GPU: NVML answers replayed through a fake `pynvml` (tests/fake_nvml.py).

Covers what a first run on a real GPU node would hit: containers whose NVML sees other PIDs, UUID pinning under an
inherited CUDA_VISIBLE_DEVICES, NVML errors mid-run, MIG slices, a GPU half used by someone else, exclusive mode.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pynvml
import pytest

from sie_router.models.config import ModelConfig
from sie_router.models.registry import build_registry
from sie_router.pool.devices import HostMemory, NoDevice, NvmlDevices, budgets, detect, visible_filter
from sie_router.pool.launch import worker_spec
from sie_router.pool.ledger import MemoryLedger
from sie_router.pool.pool import WorkerPool
from sie_router.settings import Settings
from sie_worker.protocol import WorkerSpec
from tests.fake_nvml import H100_IDLE_USED, H100_TOTAL, FakeGpu, FakeNvml, MiB

UUIDS = ["GPU-5e3a8c1f-2b6d-4e9a-8f70-1c2d3e4f5a6b", "GPU-a1b2c3d4-0000-4e9a-8f70-1c2d3e4f5a6b",
         "GPU-c3d4e5f6-1111-4e9a-8f70-1c2d3e4f5a6b"]


def three_gpus() -> FakeNvml:
    return FakeNvml([FakeGpu(uuid) for uuid in UUIDS])


# -- 1. the per-process figure in a container ------------------------------------------------------------------------


def test_a_worker_nvml_reports_gets_its_exact_figure() -> None:
    nvml = FakeNvml([FakeGpu(UUIDS[0], processes=[(4242, 1300 * MiB)])])
    assert NvmlDevices(nvml).process_memory(4242, "cuda:0", reported=800 * MiB, context_bytes=500 * MiB) == 1300 * MiB


@pytest.mark.parametrize("processes", [
    [(987654, 1300 * MiB)],  # a container without hostPID: NVML lists the host's PID, never ours
    [(4242, 0)],  # newer drivers in a container: our PID, but 0 bytes
    [(4242, None)],  # NVML_VALUE_NOT_AVAILABLE
    [],
], ids=["foreign-pid", "zero-bytes", "not-available", "no-process"])
def test_without_an_nvml_figure_the_worker_figure_gains_its_cuda_context(processes: list) -> None:
    devices = NvmlDevices(FakeNvml([FakeGpu(UUIDS[0], processes=processes)]))
    assert devices.process_memory(4242, "cuda:0", reported=800 * MiB, context_bytes=500 * MiB) == 1300 * MiB
    assert devices.process_memory(4242, "cuda:0") is None  # nothing reported either: unknown, not 0


# -- 2. UUID pinning, and the server's own CUDA_VISIBLE_DEVICES ------------------------------------------------------


def test_each_gpu_is_pinned_by_uuid() -> None:
    devices = NvmlDevices(three_gpus())
    assert [d.name for d in devices.snapshot()] == ["cuda:0", "cuda:1", "cuda:2"]
    assert [devices.cuda_visible(f"cuda:{i}") for i in range(3)] == UUIDS
    assert HostMemory().cuda_visible("cpu") == ""  # a CPU worker sees no GPU at all
    assert devices.cuda_visible("cpu") == ""  # nor on a GPU host


@pytest.mark.parametrize(("visible", "names"), [
    ("2,0", ["cuda:0", "cuda:2"]),
    (UUIDS[1], ["cuda:1"]),
    ("GPU-c3d4", ["cuda:2"]),  # a UUID prefix, as CUDA accepts
    ("1,7,2", ["cuda:1"]),  # CUDA stops at the first entry that names no GPU
])
def test_placement_keeps_to_the_gpus_the_server_may_use(visible: str, names: list[str]) -> None:
    devices = NvmlDevices(three_gpus(), visible)
    assert [d.name for d in devices.snapshot()] == names
    assert devices.cuda_visible(names[0]) == UUIDS[int(names[0][-1])]


def test_an_empty_cuda_visible_devices_hides_every_gpu() -> None:
    assert isinstance(detect("auto", "", three_gpus()), HostMemory)
    with pytest.raises(NoDevice, match="--device cuda"):
        detect("cuda", "", three_gpus())
    assert visible_filter(None, []) is None


@pytest.fixture
def pool_on(tmp_path: Path) -> Iterator[object]:
    pools: list[WorkerPool] = []

    def make(nvml: FakeNvml, visible: str | None = None, fraction: float = 0.9) -> WorkerPool:
        settings = Settings(bundle="test", gpu_memory_fraction=fraction, cuda_visible_devices=visible)
        registry = build_registry("test", (), (), offline=True)
        pools.append(WorkerPool(settings, registry, detect("cuda", visible, nvml)))
        return pools[-1]

    yield make
    for pool in pools:
        asyncio.run(pool.supervisor.close())  # closes the worker client's sockets and context


def spec_on(pool: WorkerPool, config: ModelConfig, folder: str, device: str, options: None) -> WorkerSpec:
    """The spec the pool would start a worker of `config` on `device` with."""
    return worker_spec(pool.settings, pool.devices, pool.supervisor.worker_endpoints, config, folder, device, options)


def test_the_pool_gives_each_worker_its_gpu_uuid_under_an_inherited_subset(pool_on) -> None:  # type: ignore[no-untyped-def]
    pool = pool_on(three_gpus(), visible="2,1")  # a Slurm allocation of two of the node's three GPUs
    assert {name for name, d in pool.ledger.devices.items() if d.placeable} == {"cuda:1", "cuda:2"}
    config = pool.registry.configs["test/fake-dense"]
    for device in ("cuda:1", "cuda:2"):
        spec = spec_on(pool, config, "", device, None)
        assert spec.env["CUDA_VISIBLE_DEVICES"] == UUIDS[int(device[-1])] and spec.device == device


def test_gpu_workers_load_cuda_lazily_and_grow_segments_unless_the_server_says_otherwise(
        pool_on, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("CUDA_MODULE_LOADING", raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")  # the operator's own, inherited
    pool = pool_on(three_gpus())
    config = pool.registry.configs["test/fake-dense"]
    spec = spec_on(pool, config, "", "cuda:0", None)
    assert spec.env["CUDA_MODULE_LOADING"] == "LAZY"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in spec.env, "the inherited setting is the worker's, not overwritten"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    assert spec_on(pool, config, "", "cuda:1", None).env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_cpu_workers_turn_the_tokenizers_own_threads_off_unless_the_server_says_otherwise(
        pool_on, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    gpus = pool_on(three_gpus())
    config = gpus.registry.configs["test/fake-dense"]
    assert "TOKENIZERS_PARALLELISM" not in spec_on(gpus, config, "", "cuda:0", None).env, "a GPU worker keeps them"
    host = WorkerPool(Settings(bundle="test"), build_registry("test", (), (), offline=True), detect("cpu"))
    try:
        spec = spec_on(host, config, "", "cpu", None)
        assert spec.env["TOKENIZERS_PARALLELISM"] == "false" and "CUDA_MODULE_LOADING" not in spec.env
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # the operator's own, inherited
        assert "TOKENIZERS_PARALLELISM" not in spec_on(host, config, "", "cpu", None).env
    finally:
        asyncio.run(host.supervisor.close())


# -- 4. NVML errors after start ---------------------------------------------------------------------------------------


def test_nvml_errors_mid_run_keep_the_last_good_reading_and_log_once(caplog: pytest.LogCaptureFixture) -> None:
    lost, fine = FakeGpu(UUIDS[0], used=10_000 * MiB), FakeGpu(UUIDS[1])
    devices = NvmlDevices(FakeNvml([lost, fine]))
    before = devices.snapshot()
    lost.fail["nvmlDeviceGetMemoryInfo"] = pynvml.NVMLError_GpuIsLost()
    fine.used = 20_000 * MiB
    with caplog.at_level(logging.WARNING, logger="sie.devices"):
        for _ in range(3):
            after = devices.snapshot()
    assert after[0] == before[0]  # the lost GPU: its last good reading
    assert after[1].used == 20_000 * MiB  # the other one still reads live
    assert [r.getMessage() for r in caplog.records if "cuda:0" in r.getMessage()] == [
        "NVML cannot read cuda:0 (GPU is lost); keeping its last good reading"]


@pytest.mark.parametrize("error", [pynvml.NVMLError_NoPermission(), pynvml.NVMLError_NotSupported(),
                                   pynvml.NVMLError_GpuIsLost()], ids=["mig-no-permission", "vgpu", "lost"])
def test_a_failing_process_query_falls_back_to_the_worker_figure(error: pynvml.NVMLError) -> None:
    gpu = FakeGpu(UUIDS[0], processes=[(4242, 900 * MiB)])
    devices = NvmlDevices(FakeNvml([gpu]))
    assert devices.process_memory(4242, "cuda:0", 800 * MiB, 500 * MiB) == 900 * MiB
    gpu.fail["nvmlDeviceGetComputeRunningProcesses"] = error
    assert devices.process_memory(4242, "cuda:0", 800 * MiB, 500 * MiB) == 1300 * MiB


def test_one_gpu_that_cannot_be_opened_does_not_cost_the_others() -> None:
    broken = FakeGpu(UUIDS[1], fail={"nvmlDeviceGetUUID": pynvml.NVMLError_Unknown()})
    devices = detect("auto", None, FakeNvml([FakeGpu(UUIDS[0]), broken, FakeGpu(UUIDS[2])]))
    assert isinstance(devices, NvmlDevices)
    assert [d.name for d in devices.snapshot()] == ["cuda:0", "cuda:2"]


def test_no_nvml_library_is_the_cpu_under_auto_and_one_sentence_under_cuda() -> None:
    nvml = FakeNvml([], init_error=pynvml.NVMLError_LibraryNotFound())
    assert isinstance(detect("auto", None, nvml), HostMemory)
    with pytest.raises(NoDevice) as raised:
        detect("cuda", None, nvml)
    assert str(raised.value) == ("--device cuda was given, but no GPU can be used here (NVML Shared Library Not "
                                 "Found)")
    with pytest.raises(NoDevice, match="no usable GPU"):
        detect("cuda", None, FakeNvml([]))


# -- 5. MIG -----------------------------------------------------------------------------------------------------------


def a100_with_two_slices() -> tuple[FakeNvml, FakeGpu, FakeGpu]:
    """An A100 80GB in MIG mode: a 3g.40gb slice in slot 0, slot 1 empty, a 2g.20gb slice in slot 2."""
    big = FakeGpu("MIG-11111111-2222-5333-8444-555555555555", total=40192 * MiB, used=37 * MiB)
    small = FakeGpu("MIG-66666666-7777-5888-9999-000000000000", total=19968 * MiB, used=25 * MiB)
    parent = FakeGpu("GPU-0a0a0a0a-1b1b-4c2c-8d3d-4e4e4e4e4e4e", total=81920 * MiB, mig=[big, None, small])
    return FakeNvml([parent, FakeGpu(UUIDS[1])]), big, small


def test_each_mig_slice_is_a_device_budgeted_by_its_own_memory_and_pinned_by_its_mig_uuid() -> None:
    nvml, big, small = a100_with_two_slices()
    devices = NvmlDevices(nvml)
    readings = devices.snapshot()
    assert [(d.name, d.total) for d in readings] == [
        ("cuda:0/mig0", 40192 * MiB), ("cuda:0/mig2", 19968 * MiB), ("cuda:1", H100_TOTAL)]
    assert devices.cuda_visible("cuda:0/mig0") == big.uuid and devices.cuda_visible("cuda:0/mig2") == small.uuid
    found = budgets(readings, 0.9, 0)
    assert found["cuda:0/mig0"] == int(40192 * MiB * 0.9) and found["cuda:0/mig2"] == int(19968 * MiB * 0.9)
    # Selecting the MIG GPU (by index or its own UUID) keeps both its slices; a slice's UUID keeps that slice.
    assert [d.name for d in NvmlDevices(nvml, "0").snapshot()] == ["cuda:0/mig0", "cuda:0/mig2"]
    assert [d.name for d in NvmlDevices(nvml, small.uuid).snapshot()] == ["cuda:0/mig2"]


def test_a_worker_on_a_mig_slice_is_attributed_on_that_slice() -> None:
    nvml, big, _ = a100_with_two_slices()
    big.processes = [(4242, 2000 * MiB)]
    devices = NvmlDevices(nvml)
    assert devices.process_memory(4242, "cuda:0/mig0") == 2000 * MiB
    assert devices.process_memory(4242, "cuda:0/mig2", 800 * MiB, 400 * MiB) == 1200 * MiB


# -- 6. memory others already use --------------------------------------------------------------------------------------


def test_the_budget_is_what_is_free_at_start_when_that_is_less_than_the_fraction(pool_on) -> None:  # type: ignore[no-untyped-def]
    half = FakeGpu(UUIDS[0], used=H100_TOTAL // 2)  # another process holds half the GPU
    idle = FakeGpu(UUIDS[1])
    pool = pool_on(FakeNvml([half, idle]))
    assert pool.ledger.devices["cuda:0"].budget == H100_TOTAL - H100_TOTAL // 2
    assert pool.ledger.devices["cuda:1"].budget == int(H100_TOTAL * 0.9)  # the fraction binds before the free memory
    assert pool.ledger.devices["cuda:1"].budget < H100_TOTAL - H100_IDLE_USED


def test_free_memory_is_read_again_before_each_reservation() -> None:
    ledger = MemoryLedger({"cuda:0": 10_000 * MiB})
    ledger.reserve("ours", "cuda:0", 3000 * MiB)
    ledger.observe_free("cuda:0", 2000 * MiB)  # someone else took memory since start: 2 GiB free on the card
    assert ledger.devices["cuda:0"].free == 2000 * MiB
    assert ledger.eviction_plan("cuda:0", 4000 * MiB, lambda k: True) == ["ours"]  # 2 free + 3 of ours
    assert ledger.eviction_plan("cuda:0", 6000 * MiB, lambda k: True) is None
    ledger.observe_free("cuda:0", 50_000 * MiB)  # they left: back to the start budget, never above it
    assert ledger.devices["cuda:0"].budget == 10_000 * MiB


async def test_the_pool_reserves_against_free_memory_read_just_before(pool_on) -> None:  # type: ignore[no-untyped-def]
    from sie_router.errors import SIEError

    gpu = FakeGpu(UUIDS[0])
    pool = pool_on(FakeNvml([gpu]))
    slot = pool.slots["test/fake-dense"]
    gpu.used = H100_TOTAL - 1000 * MiB  # after start, another process takes all but 1000 MiB
    with pytest.raises(SIEError) as raised:
        await pool.loader.reserve(slot, 2000 * MiB, evict=True)
    assert raised.value.code == "RESOURCE_EXHAUSTED" and "1000 MiB is free" in raised.value.message
    assert await pool.loader.reserve(slot, 900 * MiB, evict=True) == "cuda:0"


# -- 9. exclusive-process compute mode --------------------------------------------------------------------------------


def test_an_exclusive_mode_gpu_takes_one_worker(pool_on) -> None:  # type: ignore[no-untyped-def]
    exclusive = FakeGpu(UUIDS[0], compute_mode=pynvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS)
    pool = pool_on(FakeNvml([exclusive, FakeGpu(UUIDS[1], used=H100_TOTAL // 2)]))
    assert [d.exclusive for d in pool.devices.snapshot()] == [True, False]
    ledger = pool.ledger
    assert ledger.best_device() == "cuda:0"  # most free memory
    ledger.reserve("a", "cuda:0", 1000 * MiB)
    assert ledger.best_device() == "cuda:1"  # cuda:0 has 70 GiB free, but room for no second process
    # Placing there anyway means its one worker goes, however small both are; if it cannot go, no placement.
    assert ledger.eviction_plan("cuda:0", 10 * MiB, lambda k: True) == ["a"]
    assert ledger.eviction_plan("cuda:0", 10 * MiB, lambda k: False) is None
