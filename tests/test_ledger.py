"""The memory ledger, and the host's memory readings (NVML: tests/test_devices.py)."""

from __future__ import annotations

import os

from sie_router.pool.devices import HostMemory
from sie_router.pool.ledger import MemoryLedger

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


def test_host_memory_reads_ram_and_this_process() -> None:
    host = HostMemory().snapshot()[0]
    assert host.name == "cpu" and 0 < host.used < host.total and host.free > 0
    assert HostMemory().process_memory(os.getpid(), "cpu") > 10 * MiB
