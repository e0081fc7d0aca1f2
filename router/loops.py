"""Supervised background loops (router process): a long-lived asyncio task that is logged and restarted when it dies.

A loop that raises would otherwise stop for good and silently: one bad moment in a batcher would leave its model's
queue unserved until the server restarts. As uvicorn's supervisor restarts a dead worker, a `Loop`'s done-callback
logs the exception with what the loop serves and starts it again, after a back-off that doubles while it keeps dying
and is forgotten once it has run for a while (as Kubernetes restarts a crashing container).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("sie.loops")

FIRST_DELAY_S = 0.05  # the first restart comes almost at once: a one-off failure costs nothing
MAX_DELAY_S = 5.0
HEALTHY_S = 30.0  # a loop that ran this long before dying starts its back-off again from the first delay


class Loop:
    """`body()` run as a task named `name`, restarted whenever it ends other than by `stop`; `serves` says what it is
    for in the log (`the queue of model 'x'`)."""

    def __init__(self, body: Callable[[], Coroutine[Any, Any, None]], name: str, serves: str) -> None:
        self.body = body
        self.name = name
        self.serves = serves
        self.task: asyncio.Task[None] | None = None
        self.restarts = 0
        self._delay_s = FIRST_DELAY_S
        self._started = 0.0
        self._stopped = False
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._timer = None
        if self._stopped:
            return
        self._started = time.monotonic()
        self.task = asyncio.create_task(self.body(), name=self.name)
        self.task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self._stopped or task.cancelled():
            return
        if time.monotonic() - self._started >= HEALTHY_S:
            self._delay_s = FIRST_DELAY_S
        error = task.exception()
        log.error("the loop %s (%s) %s; restarting it in %.2fs", self.name, self.serves,
                  "failed" if error else "returned", self._delay_s, exc_info=error)
        self.restarts += 1
        self._timer = asyncio.get_running_loop().call_later(self._delay_s, self.start)
        self._delay_s = min(MAX_DELAY_S, self._delay_s * 2)

    async def stop(self) -> None:
        """Cancel the loop for good and wait for it to end."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("the loop %s (%s) failed while stopping", self.name, self.serves)
