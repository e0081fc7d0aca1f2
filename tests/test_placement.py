"""Placement: estimates before a worker measures itself, reservation plans, and reservations that follow growth."""

from __future__ import annotations

from pathlib import Path

import pytest

from sie_router.errors import SIEError
from sie_router.models.config import ModelConfig, Profile
from sie_router.pool.devices import DeviceMemory
from sie_router.pool.placement import (
    DEFAULT_BASE,
    LEAN_CPU_BASE,
    LEAN_WEIGHTS_FACTOR,
    WEIGHTS_MEMORY_FACTOR,
    Placement,
)
from sie_router.settings import Settings

MiB = 2**20


class FakeHost:
    """A 10 GiB host whose workers hold whatever the test says."""

    def __init__(self) -> None:
        self.held: dict[int, int] = {}

    def snapshot(self) -> list[DeviceMemory]:
        return [DeviceMemory("cpu", None, 10 * 1024 * MiB, 0)]

    def process_memory(self, pid: int, device: str, reported: int = 0, context_bytes: int = 0) -> int | None:
        return self.held.get(pid)

    def cuda_visible(self, device: str) -> str:
        return ""


def config(memory_mb: int | None = None, family: str = "fake") -> ModelConfig:
    return ModelConfig(sie_id="m", profiles={"default": Profile(adapter=family)}, memory_mb=memory_mb)


def test_the_estimate_is_the_configs_figure_else_a_process_base_plus_the_weights_and_a_working_set(
        tmp_path: Path) -> None:
    placement = Placement(Settings(memory_budget=1000 * MiB), FakeHost())
    assert placement.estimate("m", config(memory_mb=300), "") == 300 * MiB
    assert placement.estimate("m", config(), "") == DEFAULT_BASE["cpu"]  # no weights (package-backed): the base
    (tmp_path / "model.safetensors").write_bytes(b"\0" * MiB)
    (tmp_path / "README.md").write_bytes(b"\0" * MiB)  # not weights
    assert placement.estimate("m", config(), str(tmp_path)) == DEFAULT_BASE["cpu"] + int(MiB * WEIGHTS_MEMORY_FACTOR)


def test_the_process_base_is_learned_from_the_workers_measured_on_the_device(tmp_path: Path) -> None:
    """Three tiny models under a budget of 2.5 workers (the issue's case): once the first measured itself, the third
    model's estimate no longer fits beside the other two, so the plan evicts one before it spawns."""
    host = FakeHost()
    placement = Placement(Settings(memory_budget=1353 * MiB), host)
    assert placement.estimate("a", config(), "") == DEFAULT_BASE["cpu"]
    for pid, key in enumerate(("a", "b")):
        nbytes = placement.estimate(key, config(), "")
        assert placement.plan(key, nbytes, lambda k: True) == ("cpu", [])
        placement.reserve(key, "cpu", nbytes)
        host.held[pid] = 545 * MiB  # what a tiny model's worker held, measured
        placement.settle(key, pid, "cpu", reported=0)
    assert placement.estimate("c", config(), "") == 545 * MiB  # learned from a and b
    assert placement.plan("c", 545 * MiB, lambda k: True) == ("cpu", ["a"])


def test_the_median_base_ignores_one_odd_worker_and_outlives_its_eviction() -> None:
    host = FakeHost()
    placement = Placement(Settings(memory_budget=10_000 * MiB), host)
    for pid, (key, held) in enumerate((("a", 100), ("b", 120), ("huge", 3000))):
        placement.estimate(key, config(), "")
        placement.reserve(key, "cpu", 1)
        host.held[pid] = held * MiB
        placement.settle(key, pid, "cpu", reported=0)
    assert placement.base("cpu") == 120 * MiB
    placement.release("a")
    assert placement.base("cpu") == 120 * MiB, "an evicted worker's measurement still says what a worker costs"
    assert placement.base("cuda:0") > DEFAULT_BASE["cpu"], "a GPU with no worker yet: the generous default"
    assert placement.estimate("huge", config(), "") == 3000 * MiB, "a model measured before: its own figure"
    assert placement.estimate("huge", config(memory_mb=50), "") == 50 * MiB, "the config's figure still wins"


def test_the_base_is_learned_per_kind_of_worker_so_lean_workers_do_not_shrink_torch_estimates() -> None:
    """On the CPU a lean dense worker runs without torch while a GLiNER one imports torch (~400 MiB): each estimate
    comes from workers of its own family and engine once one has measured itself, else from those of its engine."""
    host = FakeHost()
    placement = Placement(Settings(memory_budget=10_000 * MiB), host)
    for pid, (key, family, held, engine) in enumerate((("d1", "dense", 70, "openvino"), ("d2", "dense", 90, "onnx"),
                                                       ("s1", "gliner", 480, "torch"))):
        placement.estimate(key, config(family=family), "")
        placement.reserve(key, "cpu", 1)
        host.held[pid] = held * MiB
        placement.settle(key, pid, "cpu", reported=0, engine=engine)
    assert placement.estimate("d3", config(family="dense"), "") == 80 * MiB
    assert placement.estimate("s2", config(family="gliner"), "") == 480 * MiB
    assert placement.estimate("c1", config(family="ner"), "", engine="torch") == 480 * MiB, "none yet: torch's"
    assert placement.estimate("d4", config(family="dense"), "", engine="torch") == 480 * MiB, "engine: torch"


TINY_WEIGHTS = 132_504  # tests/tiny_models.py's build_dense_st: its model.safetensors


def test_a_lean_workers_first_estimate_is_a_lean_workers_size_so_tiny_models_fit_a_small_budget(
        tmp_path: Path) -> None:
    """The issue's case: --memory-budget 294M (280 MiB) and tiny dense models whose lean workers hold ~120 MiB. The
    first estimate is a lean worker's, not a torch worker's 400 MiB, so the first fits, and once it measured itself
    the second fits beside it; a torch worker's estimate stays torch's."""
    (tmp_path / "model.safetensors").write_bytes(b"\0" * TINY_WEIGHTS)
    host = FakeHost()
    placement = Placement(Settings(memory_budget=294_000_000), host)
    first = placement.estimate("a", config(family="dense"), str(tmp_path))
    assert first == LEAN_CPU_BASE + int(TINY_WEIGHTS * LEAN_WEIGHTS_FACTOR)
    assert 120 * MiB <= first <= 140 * MiB, "honest, and two fit: a tiny lean worker measured 120 MiB RSS at Ready"
    assert 2 * first <= placement.ledger.devices["cpu"].free, "two loads started together fit"
    assert placement.estimate("t", config(family="gliner"), str(tmp_path)) > DEFAULT_BASE["cpu"]
    assert placement.plan("a", first, lambda k: True) == ("cpu", [])
    placement.reserve("a", "cpu", first)
    host.held[1] = 120 * MiB
    placement.settle("a", 1, "cpu", reported=0, engine="openvino")
    second = placement.estimate("b", config(family="dense"), str(tmp_path))
    assert second == 120 * MiB, "learned from the first lean worker"
    assert placement.plan("b", second, lambda k: False) == ("cpu", [])


def test_a_lean_family_that_fell_back_to_torch_teaches_torchs_base(tmp_path: Path) -> None:
    host = FakeHost()
    placement = Placement(Settings(memory_budget=10_000 * MiB), host)
    placement.estimate("a", config(family="dense"), "")
    placement.reserve("a", "cpu", 1)
    host.held[1] = 500 * MiB
    placement.settle("a", 1, "cpu", reported=0, engine="torch")  # its export failed: the torch adapter serves it
    assert placement.estimate("s", config(family="gliner"), "") == 500 * MiB
    assert placement.estimate("b", config(family="dense"), "") == LEAN_CPU_BASE, "no lean worker measured yet"


def test_an_export_reserves_the_helper_beside_the_worker_until_ready_and_is_refused_when_it_cannot_fit(
        tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\0" * TINY_WEIGHTS)
    host = FakeHost()
    placement = Placement(Settings(memory_budget=1000 * MiB), host)
    placement.reserve("idle", "cpu", 400 * MiB)
    estimate = placement.estimate("new", config(family="dense"), str(tmp_path))
    placement.reserve("new", "cpu", estimate)
    extra, victims = placement.plan_export("new", lambda k: True)
    assert extra == placement.export_estimate("new") >= 511 * MiB  # the helper measured 511 MiB RSS at its peak
    assert victims == ["idle"], "1000 - 400 - the worker's estimate leaves less than the helper needs"
    placement.release("idle")
    placement.grow("new", extra)
    assert placement.ledger.reserved("new") == estimate + extra
    host.held[1] = 120 * MiB
    placement.settle("new", 1, "cpu", reported=0, engine="openvino")
    assert placement.ledger.reserved("new") == 120 * MiB, "after Ready the ledger holds the measured size"
    placement.reserve("other", "cpu", 500 * MiB)
    with pytest.raises(SIEError) as refused:
        placement.plan_export("new", lambda k: False)
    assert refused.value.code == "RESOURCE_EXHAUSTED" and "exporting its graph" in refused.value.message


def test_after_ready_an_overrun_evicts_lru_idle_models_or_fails_beyond_the_tolerance() -> None:
    host = FakeHost()
    placement = Placement(Settings(memory_budget=1000 * MiB), host)
    for pid, key in enumerate(("old", "busy")):
        placement.reserve(key, "cpu", 300 * MiB)
        host.held[pid] = 300 * MiB
        placement.settle(key, pid, "cpu", reported=0)
    placement.reserve("new", "cpu", 400 * MiB)
    assert placement.fit("new", "cpu", lambda k: True) == []  # within budget
    host.held[9] = 600 * MiB
    placement.settle("new", 9, "cpu", reported=0)  # 1200 MiB measured against 1000
    assert placement.overrun("cpu") == 200 * MiB
    assert placement.fit("new", "cpu", lambda k: k != "busy") == ["old"]  # never the new model, never a busy one
    placement.estimate("new", config(), "")  # its estimate came from the base: its measure teaches the base
    placement.settle("new", 9, "cpu", reported=0)
    assert placement.base("cpu") == 600 * MiB
    with pytest.raises(SIEError) as refused:
        placement.fit("new", "cpu", lambda k: False)
    assert refused.value.code == "RESOURCE_EXHAUSTED" and "over its budget" in refused.value.message
    assert placement.base("cpu") == DEFAULT_BASE["cpu"], "a worker refused as too big does not teach the base"
    host.held[9] = 420 * MiB  # 20 MiB over: within the 5 % tolerance, kept when nothing can go
    placement.settle("new", 9, "cpu", reported=0)
    assert placement.fit("new", "cpu", lambda k: False) == []
    assert placement.fit("new", "cpu", lambda k: True) == ["old"], "evictable models still go to fit the budget"


def test_a_plan_evicts_least_recently_used_evictable_models_and_never_the_model_itself() -> None:
    placement = Placement(Settings(memory_budget=1000 * MiB), FakeHost())
    for key in ("a", "b", "busy"):
        placement.reserve(key, "cpu", 300 * MiB)
    placement.touch("a")  # LRU order: b, busy, a
    assert placement.plan("new", 300 * MiB, lambda k: k != "busy") == ("cpu", ["b"])
    assert placement.plan("b", 400 * MiB, lambda k: True) == ("cpu", ["busy"])  # not "b" itself
    with pytest.raises(SIEError) as refused:
        placement.plan("new", 900 * MiB, lambda k: k == "a")
    assert refused.value.code == "RESOURCE_EXHAUSTED" and "no idle model can be evicted" in refused.value.message


def test_reservations_settle_on_the_measured_figure_and_only_ever_rise() -> None:
    host = FakeHost()
    placement = Placement(Settings(memory_budget=1000 * MiB), host)
    placement.reserve("m", "cpu", 300 * MiB)
    host.held[42] = 120 * MiB
    assert placement.settle("m", 42, "cpu", reported=999 * MiB) == 120 * MiB  # the device's reading wins
    assert placement.settle("m", 7, "cpu", reported=150 * MiB) == 150 * MiB  # no reading: the worker's figure
    host.held[7] = 400 * MiB
    placement.remeasure([("m", 7, "cpu", 150 * MiB, 0)])
    assert placement.ledger.reserved("m") == 400 * MiB
    host.held[7] = 200 * MiB
    placement.remeasure([("m", 7, "cpu", 150 * MiB, 0)])
    assert placement.ledger.reserved("m") == 400 * MiB
    placement.release("m")
    assert placement.ledger.reserved("m") is None and placement.ledger.devices["cpu"].free == 1000 * MiB


def test_a_reservation_follows_a_worker_that_fell_back_to_another_device() -> None:
    class HostWithGpu(FakeHost):
        def snapshot(self) -> list[DeviceMemory]:
            return [*super().snapshot(), DeviceMemory("cuda:0", 0, 80 * 1024 * MiB, 0)]

    placement = Placement(Settings(memory_budget=1000 * MiB), HostWithGpu())
    placement.reserve("m", "cuda:0", 300 * MiB)
    placement.move("m", "cpu")
    assert placement.ledger.placement["m"] == "cpu"
    assert placement.ledger.devices["cpu"].free == 700 * MiB
    assert "m" not in placement.ledger.devices["cuda:0"].reserved


def test_with_gpus_only_a_worker_that_fell_back_to_the_cpu_moves_off_the_gpu_budget() -> None:
    """NVML lists GPUs only: the host is in the ledger all the same, for fallback workers, and never placed on."""

    class GpuOnly(FakeHost):
        def snapshot(self) -> list[DeviceMemory]:
            return [DeviceMemory("cuda:0", 0, 2 * 1024 * MiB, 0, free=2 * 1024 * MiB)]

    placement = Placement(Settings(memory_budget=8 * 1024 * MiB, gpu_memory_fraction=0.5), GpuOnly())
    gpu = placement.ledger.devices["cuda:0"]
    assert placement.ledger.best_device() == "cuda:0"  # though the host has more room
    placement.reserve("m", "cuda:0", 300 * MiB)
    placement.move("m", "cpu")
    assert placement.ledger.placement["m"] == "cpu" and not gpu.reserved and gpu.free == 1024 * MiB
    assert placement.ledger.devices["cpu"].free == 8 * 1024 * MiB - 300 * MiB
    assert placement.plan("n", 500 * MiB, lambda _k: False) == ("cuda:0", [])


def test_a_model_whose_export_was_refused_is_estimated_with_its_helper_until_a_worker_of_it_is_ready(
        tmp_path: Path) -> None:
    """Else each retry would spawn a worker, start its export, and be refused only then (and a client told
    MODEL_LOADING meanwhile would come back for the next one, forever)."""
    (tmp_path / "model.safetensors").write_bytes(b"\0" * TINY_WEIGHTS)
    host = FakeHost()
    placement = Placement(Settings(memory_budget=294_000_000), host)
    alone = placement.estimate("m", config(family="dense"), str(tmp_path))
    placement.reserve("m", "cpu", alone)
    with pytest.raises(SIEError):
        placement.plan_export("m", lambda k: True)  # 280 MiB cannot hold the helper (over 512 MiB)
    placement.release("m")
    again = placement.estimate("m", config(family="dense"), str(tmp_path))
    assert again == alone + placement.export_estimate("m")
    with pytest.raises(SIEError) as refused:
        placement.plan("m", again, lambda k: True)
    assert "with the export of its graph" in refused.value.message
    placement.ledger.devices["cpu"].budget = 2000 * MiB
    placement.reserve("m", "cpu", again)
    assert placement.plan_export("m", lambda k: True) == (0, []), "its reservation holds the helper already"
    host.held[1] = 120 * MiB
    placement.settle("m", 1, "cpu", reported=0, engine="openvino")
    assert placement.estimate("m", config(family="dense"), str(tmp_path)) == 120 * MiB, "its graph is cached now"
