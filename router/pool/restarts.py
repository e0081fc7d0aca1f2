"""Restart back-off (router process): how long a model waits before its next worker after one died or hung.

As Kubernetes restarts a crashing container: each crash of a worker that had become ready waits twice as long as the
one before (`restart_backoff_s`, doubling up to `restart_backoff_max_s`), and a worker that served for
`restart_backoff_reset_s` before it crashed starts the sequence again. Nothing locks a model out: one bad minute on
the node costs a few restarts, never an outage. Load failures (before `Ready`) are not crashes; the pool retries
transient ones after their cooldown and leaves permanent ones failed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from sie_router.errors import SIEError
from sie_router.settings import Settings
from sie_sdk.codes import ErrorCode


@dataclass
class Backoff:
    """One model's restarts: how many, how many in a row, and when the next worker may start."""

    restarts: int = 0  # crashes and hangs of ready workers since the server started (or the operator's eviction)
    in_a_row: int = 0  # crashes since the last healthy run
    until: float = 0.0  # monotonic time before which no new worker starts

    def left(self, now: float | None = None) -> float:
        """Seconds of back-off left (0 when a worker may start)."""
        return max(0.0, self.until - (time.monotonic() if now is None else now))


class Restarts:
    """The back-off of every model, keyed by model key."""

    def __init__(self, settings: Settings) -> None:
        self.first_s = settings.restart_backoff_s
        self.max_s = settings.restart_backoff_max_s
        self.reset_s = settings.restart_backoff_reset_s
        self.models: dict[str, Backoff] = {}

    def crashed(self, key: str, served_s: float, now: float | None = None) -> float:
        """A ready worker of `key` died or hung after serving `served_s` seconds; the back-off before the next one."""
        backoff = self.models.setdefault(key, Backoff())
        if served_s >= self.reset_s:
            backoff.in_a_row = 0  # a healthy run: this crash is the first of a new sequence
        delay = min(self.max_s, self.first_s * 2.0 ** backoff.in_a_row)
        backoff.restarts += 1
        backoff.in_a_row += 1
        backoff.until = (time.monotonic() if now is None else now) + delay
        return delay

    def of(self, key: str) -> Backoff:
        return self.models.get(key) or Backoff()

    def left(self, key: str) -> float:
        backoff = self.models.get(key)
        return backoff.left() if backoff else 0.0

    def restarting(self, key: str, why: str) -> SIEError:
        """503 MODEL_LOADING for a model whose worker died or hung: Retry-After is the back-off left (at least 1 s,
        the header's unit), and the native body says how many restarts and how long."""
        backoff = self.of(key)
        left = backoff.left()
        return SIEError(ErrorCode.MODEL_LOADING, f"{why}; model '{key}' is restarting" +
                        (f" in {left:.1f}s" if left else "") + ", retry shortly",
                        retry_after=max(1, math.ceil(left)), restarts=backoff.restarts, backoff_s=round(left, 3))

    def forget(self, key: str) -> None:
        """An operator's eviction: the model starts afresh."""
        self.models.pop(key, None)
