"""The memory ledger (router process): per-device budgets, reservations per model, and LRU eviction plans.

A model reserves an estimate before its worker spawns; the measured figure replaces it once the worker is ready.
The ledger's recency is the server's one clock of model use: LRU eviction and the idle TTL both read it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


@dataclass
class DeviceBudget:
    """`limit` is the budget set at start; `budget` is that, or less while the device has less room than that."""

    name: str
    budget: int
    reserved: dict[str, int] = field(default_factory=dict)
    exclusive: bool = False  # exclusive-process compute mode: one worker at most
    limit: int = -1
    # False for the host beside GPUs: no model is placed there, but a worker that fell back to the CPU is held there.
    placeable: bool = True

    def __post_init__(self) -> None:
        self.limit = self.budget if self.limit < 0 else self.limit

    @property
    def free(self) -> int:
        return self.budget - sum(self.reserved.values())

    @property
    def room(self) -> int:
        """Free budget for one more model: none on an exclusive-mode GPU that already holds one."""
        return 0 if self.exclusive and self.reserved else self.free


class MemoryLedger:
    def __init__(self, budgets: dict[str, int], exclusive: set[str] | frozenset[str] = frozenset(),
                 fallback_only: set[str] | frozenset[str] = frozenset()) -> None:
        self.devices = {name: DeviceBudget(name, budget, exclusive=name in exclusive,
                                           placeable=name not in fallback_only)
                        for name, budget in budgets.items()}
        self.placement: dict[str, str] = {}
        self.recency: OrderedDict[str, float] = OrderedDict()  # model -> when last used, least recent first
        # Counts the times memory was freed (a reservation released or settled lower, a budget grown back): a load
        # refused for memory is tried again only once this has moved (WorkerPool's refusals).
        self.freed = 0

    def best_device(self) -> str:
        """The placeable device with the most room."""
        return max((d for d in self.devices.values() if d.placeable), key=lambda d: d.room).name

    def observe_free(self, device: str, free_now: int) -> None:
        """Shrink the device's budget to what this server holds there plus what is free on it now, so memory another
        process took since start is not promised twice; it grows back to the start budget as that memory returns."""
        budget = self.devices[device]
        before, budget.budget = budget.budget, min(budget.limit, sum(budget.reserved.values()) + max(0, free_now))
        self.freed += budget.budget > before

    def reserve(self, key: str, device: str, nbytes: int) -> None:
        self.release(key)
        self.devices[device].reserved[key] = nbytes
        self.placement[key] = device
        self.touch(key)

    def settle(self, key: str, measured: int) -> None:
        """Replace the estimate with the measured figure."""
        device = self.placement.get(key)
        if device is not None:
            reserved = self.devices[device].reserved
            self.freed += measured < reserved.get(key, 0)
            reserved[key] = measured

    def release(self, key: str) -> None:
        device = self.placement.pop(key, None)
        if device is not None:
            self.freed += self.devices[device].reserved.pop(key, None) is not None
        self.recency.pop(key, None)

    def touch(self, key: str) -> None:
        """Mark a model as just used (most recent last)."""
        self.recency[key] = time.monotonic()
        self.recency.move_to_end(key)

    def last_used(self, key: str) -> float | None:
        """When a model holding a reservation was last used (`time.monotonic()`), or None."""
        return self.recency.get(key)

    def reserved(self, key: str) -> int | None:
        device = self.placement.get(key)
        return None if device is None else self.devices[device].reserved.get(key)

    def eviction_plan(self, device: str, needed: int, evictable: Callable[[str], bool]) -> list[str] | None:
        """Least-recently-used evictable models on `device` whose release frees `needed` bytes; None if impossible."""
        budget = self.devices[device]
        if budget.exclusive and budget.reserved:  # its one worker must go, whatever the sizes
            others = list(self._lru_on(device))
            return others if budget.budget >= needed and all(evictable(k) for k in others) else None
        if budget.free >= needed:
            return []
        victims: list[str] = []
        freed = budget.free
        for key in self._lru_on(device):
            if not evictable(key):
                continue
            victims.append(key)
            freed += budget.reserved.get(key, 0)
            if freed >= needed:
                return victims
        return None

    def _lru_on(self, device: str) -> Iterable[str]:
        return [k for k in self.recency if self.placement.get(k) == device]
