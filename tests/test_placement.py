"""Placement: estimates before a worker measures itself, reservation plans, and reservations that follow growth."""

from __future__ import annotations

from pathlib import Path

import pytest

from sie_router.devices import DeviceMemory
from sie_router.errors import SIEError
from sie_router.placement import DEFAULT_ESTIMATE, WEIGHTS_MEMORY_FACTOR, Placement
from sie_router.registry import ModelConfig, Profile
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


def config(memory_mb: int | None = None) -> ModelConfig:
    return ModelConfig(sie_id="m", profiles={"default": Profile(adapter="fake")}, memory_mb=memory_mb)


def test_the_estimate_comes_from_the_config_then_the_weight_files_then_a_default(tmp_path: Path) -> None:
    assert Placement.estimate(config(memory_mb=300), "") == 300 * MiB
    assert Placement.estimate(config(), "") == DEFAULT_ESTIMATE
    (tmp_path / "model.safetensors").write_bytes(b"\0" * MiB)
    (tmp_path / "README.md").write_bytes(b"\0" * MiB)  # not weights
    assert Placement.estimate(config(), str(tmp_path)) == int(MiB * WEIGHTS_MEMORY_FACTOR)


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
