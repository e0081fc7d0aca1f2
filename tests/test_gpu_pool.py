"""The pool on GPUs without a GPU (tests/fake_nvml.py): batches sized by tokens, one load at a time per GPU, the
ledger following a worker's allocator through `BatchDone`, and worker threads from the cgroup's CPU quota."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sie_router.models.registry import build_registry
from sie_router.pool.batcher import CPU_BATCH_ITEMS, CPU_REQUEST_ITEMS, item_cap
from sie_router.pool.devices import available_cpus, cgroup_cpu_quota, detect
from sie_router.pool.pool import WorkerPool
from sie_router.pool.slots import ModelState
from sie_router.pool.supervisor import Worker
from sie_router.settings import Settings
from sie_worker.options import GPU_MAX_BATCH_TOKENS
from sie_worker.protocol import BatchDone, EncodeBatch, EncodeResult, InputItem, Ready, Tensor
from tests.fake_nvml import FakeGpu, FakeNvml, MiB

UUID = "GPU-5e3a8c1f-2b6d-4e9a-8f70-1c2d3e4f5a6b"
MODEL = "test/fake-dense"  # its profile sets max_batch_tokens 16384


@pytest.fixture
async def pools() -> AsyncIterator[Callable[..., WorkerPool]]:
    made: list[WorkerPool] = []

    def make(device: str = "cuda", nvml: FakeNvml | None = None, **settings: Any) -> WorkerPool:
        devices = detect(device, None, nvml or FakeNvml([FakeGpu(UUID)]))
        made.append(WorkerPool(Settings(bundle="test", **settings), build_registry("test", (), (), offline=True),
                               devices))
        return made[-1]

    yield make
    for pool in made:
        await pool.supervisor.close()


async def test_on_a_gpu_the_token_budget_sizes_a_batch_and_the_item_cap_follows(pools) -> None:  # type: ignore[no-untyped-def]
    gpu = pools().batch_limits(MODEL)
    assert (gpu.max_tokens, gpu.max_items) == (16384, 1024)  # the profile's budget, at 16 tokens an item
    cpu = pools("cpu").batch_limits(MODEL)
    assert (cpu.max_tokens, cpu.max_items) == (16384, CPU_BATCH_ITEMS)
    # A client batch stays whole further on the CPU (up to CPU_REQUEST_ITEMS); on a GPU the item cap already holds it.
    assert (cpu.request_items, gpu.request_items) == (CPU_REQUEST_ITEMS, 1024)
    override = pools(max_batch_items=200).batch_limits(MODEL)
    assert (override.max_items, override.request_items) == (200, 200)  # --max-batch-items caps every batch
    assert pools("cpu", max_batch_items=8).batch_limits(MODEL).request_items == 8
    # A profile without a budget of its own gets the GPU's, and the worker's spec the same figure.
    config = pools().registry.configs[MODEL]
    config.profiles["default"].max_batch_tokens = None
    assert config.max_batch_tokens(gpu=True) == GPU_MAX_BATCH_TOKENS
    assert item_cap(0, GPU_MAX_BATCH_TOKENS, gpu=True) == GPU_MAX_BATCH_TOKENS // 16


async def test_models_load_one_at_a_time_per_gpu(pools, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A worker's CUDA context is the GPU's free memory before and after its load: a neighbour loading beside it on
    the same GPU would fall into the difference (`-m a -m b` loads in parallel)."""
    pool = pools()
    running: list[str] = []
    overlaps: list[set[str]] = []
    release = asyncio.Event()

    async def spawn(spec: Any, key: str, on_export: Any = None) -> Worker:
        running.append(key)
        overlaps.append(set(running))
        await release.wait()
        running.remove(key)
        worker = Worker(worker_id=spec.worker_id, key=key, process=None, device=spec.device)  # type: ignore[arg-type]
        worker.info = Ready(worker_id=spec.worker_id, model=key, device=spec.device, memory_bytes=MiB, dims={},
                            capabilities=[], engine="fake")
        return worker

    monkeypatch.setattr(pool.supervisor, "spawn", spawn)
    loads = [asyncio.create_task(pool.loader.start_worker(pool.slots[key], evict=False))
             for key in (MODEL, "test/fake-slow-load")]
    async with asyncio.timeout(5):
        while not running:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the second load had its chance to start beside the first
        release.set()
        await asyncio.gather(*loads)
    assert [len(seen) for seen in overlaps] == [1, 1]


async def test_the_ledger_follows_a_gpu_worker_s_allocator_where_nvml_has_no_per_process_figure(pools) -> None:  # type: ignore[no-untyped-def]
    # A container without hostPID: NVML lists the host's PIDs, never the worker's.
    pool = pools(nvml=FakeNvml([FakeGpu(UUID, processes=[(987654, 5000 * MiB)])]))
    slot = pool.slots[MODEL]
    worker = Worker(worker_id="w", key=MODEL, process=None, device="cuda:0")  # type: ignore[arg-type]
    worker.info = Ready(worker_id="w", model=MODEL, device="cuda:0", memory_bytes=600 * MiB, dims={"dense": 2},
                        capabilities=[], engine="torch", pid=4242, context_bytes=500 * MiB)
    slot.state, slot.worker = ModelState.LOADED, worker
    pool.placement.reserve(MODEL, "cuda:0", 0)
    assert pool.placement.settle(MODEL, 4242, "cuda:0", 600 * MiB, 500 * MiB) == 1100 * MiB

    def answer(reserved: int) -> None:
        async def call(worker_id: str, make: Any, deadline_s: float) -> BatchDone:
            dense = Tensor.from_numpy(np.ones((1, 2), dtype=np.float32))
            return BatchDone(batch_id=1, result=EncodeResult(token_counts=[1], dense=dense),
                             memory_allocated=reserved // 2, memory_reserved=reserved)
        pool.supervisor.client.call = call  # type: ignore[method-assign]

    batch = EncodeBatch(batch_id=1, items=[InputItem(text="x")], output_types=["dense"])
    answer(2000 * MiB)  # a longer batch grew the allocator after Ready
    await pool.run_batch(worker, lambda _id: batch, items=1, cost=1)
    assert pool.ledger.reserved(MODEL) == 2500 * MiB  # its allocator, plus the context it measured at start
    answer(900 * MiB)  # reservations only rise: what the allocator gave back it can take again
    await pool.run_batch(worker, lambda _id: batch, items=1, cost=1)
    assert pool.ledger.reserved(MODEL) == 2500 * MiB


@pytest.mark.parametrize(("files", "quota"), [
    ({"cpu.max": "400000 100000\n"}, 4.0),  # cgroup v2, a 4-CPU limit
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),  # no limit
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),  # cgroup v1
    ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),  # no cgroup filesystem
], ids=["v2", "v2-fraction", "v2-max", "v1", "v1-none", "none"])
def test_the_cpu_quota_is_read_from_the_cgroup(tmp_path: Path, files: dict[str, str], quota: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == quota


def test_worker_threads_follow_the_quota_not_the_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(64)))  # a 64-core node
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert available_cpus(tmp_path) == 2  # 1.5 CPUs: two threads, rounded up
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) == 64
