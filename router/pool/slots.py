"""A model as the pool sees it (router process): its load state and its `Slot`, which every part of the pool reads
and the pool's parts (loader, eviction, the facade) update. It holds no behaviour of its own beyond derived views."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sie_router.errors import LoadError
from sie_router.models.config import ModelConfig
from sie_router.pool.batcher import Batcher
from sie_router.pool.pacing import BusyTimeFit
from sie_router.pool.refusals import Refusal
from sie_router.pool.supervisor import Worker

__all__ = ["ModelState", "Slot", "loaded_workers"]


class ModelState(StrEnum):
    """A model's load state, as `/v1/models` shows it."""

    AVAILABLE = "available"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


@dataclass
class Slot:
    """A model as the pool sees it: its config, its worker if any, its load state, its queue and its pace."""

    key: str
    config: ModelConfig
    state: ModelState = ModelState.AVAILABLE
    worker: Worker | None = None
    loading: asyncio.Task[Worker] | None = None
    load_error: LoadError | None = None
    load_started: float = 0.0
    failed_at: float = 0.0
    refusal: Refusal | None = None  # its last load was refused for memory
    placed: asyncio.Event = field(default_factory=asyncio.Event)  # set once its load in progress has memory reserved
    batcher: Batcher | None = None
    # Busy seconds per batch by its cost: learned by the batcher from the worker's own timing, read for deadlines.
    pace: BusyTimeFit = field(default_factory=BusyTimeFit)
    removing: bool = False  # unregistered: its admitted requests finish, and it never loads again

    @property
    def queued(self) -> int:
        return self.batcher.queued_items if self.batcher else 0

    @property
    def last_error(self) -> dict[str, Any] | None:
        return self.load_error.summary() if self.load_error else None


def loaded_workers(slots: dict[str, Slot]) -> Iterator[tuple[str, int, str, int, int]]:
    """Each loaded model's (key, pid, device, reported bytes, context bytes): what `Placement.remeasure` reads."""
    for key, s in slots.items():
        if s.state == ModelState.LOADED and s.worker is not None and s.worker.info is not None:
            yield key, s.worker.info.pid, s.worker.device, s.worker.info.memory_bytes, s.worker.info.context_bytes
