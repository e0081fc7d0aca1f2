"""Loads refused for memory (router process): a refusal stands as every request's answer until memory is freed or
its hold passes, so that clients polling a model that does not fit do not start a load each."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sie_router.errors import SIEError


@dataclass(frozen=True)
class Refusal:
    """A load that placement refused for memory. While it stands, every request for the model is answered with it
    (503 RESOURCE_EXHAUSTED, Retry-After the time left) and no new load starts: it stands until memory is freed (the
    ledger's `freed` count moves: a worker stopped or evicted, a reservation settled lower) or its hold passes. A
    refusal of a load that could not evict (a preload, a restart) does not hold back a request that may evict. The
    hold (`Settings.load_refusal_hold_s`) bounds it because models that were busy may be idle by then, and so
    evictable, and a GPU's free memory may have grown without this server freeing any."""

    error: SIEError
    freed: int  # the ledger's `freed` count when it was refused
    until: float  # time.monotonic() when the hold ends
    evicting: bool

    def left(self, freed: int, evict: bool) -> float:
        """Seconds it still stands for a request that may (`evict`) or may not evict; 0 when it no longer does."""
        if freed != self.freed or (evict and not self.evicting):
            return 0.0
        return max(0.0, self.until - time.monotonic())
