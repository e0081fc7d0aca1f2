"""Running a request's work so that it stops when its client goes away or its deadline passes (router process).

A cancelled call cancels its batcher entries, which are then skipped: the model never sees work nobody waits for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from sie_router.api.state import app_state
from sie_router.errors import SIEError
from sie_sdk.codes import ErrorCode

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _disconnected(request: Request) -> None:
    # The body has been read in full, so the next ASGI message can only be the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def guarded(request: Request, work: Awaitable[T]) -> T:
    """The result of `work`, cancelled if the client disconnects first or the request deadline (if set) passes."""
    deadline_s = app_state(request).settings.request_timeout_s
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, timeout=deadline_s if deadline_s > 0 else None,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    if watcher in done:
        raise ClientGone()
    raise SIEError(ErrorCode.DEADLINE_EXCEEDED, f"the request did not finish within {deadline_s:g}s")
