"""Supervised loops: a background loop that raises or returns is logged with what it serves and started again,
with a back-off that grows while it keeps dying; a stopped loop stays stopped."""

from __future__ import annotations

import asyncio
import itertools
import logging

import pytest

from sie_router import loops
from sie_router.loops import Loop


async def _until(condition: object, timeout: float = 5.0) -> None:
    async def wait() -> None:
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.005)

    await asyncio.wait_for(wait(), timeout)


async def test_a_loop_that_raises_is_logged_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    runs: list[int] = []

    async def body() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise RuntimeError("injected")
        await asyncio.Event().wait()  # the second run serves until stopped

    loop = Loop(body, "sie-test", "the queue of model 'm'")
    with caplog.at_level(logging.ERROR, logger="sie.loops"):
        loop.start()
        await _until(lambda: len(runs) == 2)
    assert loop.restarts == 1
    record = caplog.records[-1]
    assert "sie-test" in record.getMessage() and "model 'm'" in record.getMessage()
    assert record.exc_info is not None and "injected" in str(record.exc_info[1])
    await loop.stop()
    assert loop.task is not None and loop.task.cancelled()


async def test_restarts_back_off_while_the_loop_keeps_dying(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loops, "FIRST_DELAY_S", 0.01)
    monkeypatch.setattr(loops, "MAX_DELAY_S", 0.04)
    started: list[float] = []

    async def body() -> None:
        started.append(asyncio.get_running_loop().time())
        raise RuntimeError("always")

    loop = Loop(body, "sie-test", "nothing")
    loop.start()
    await _until(lambda: len(started) == 5)
    await loop.stop()
    gaps = [b - a for a, b in itertools.pairwise(started)]
    assert gaps[0] >= 0.009 and gaps[1] >= 0.019 and all(gap >= 0.039 for gap in gaps[2:])
    count = len(started)
    await asyncio.sleep(0.1)
    assert len(started) == count  # stopped while waiting to restart: stays stopped


async def test_a_loop_that_returns_is_restarted_too() -> None:
    runs: list[int] = []

    async def body() -> None:
        runs.append(1)
        if len(runs) > 1:
            await asyncio.Event().wait()

    loop = Loop(body, "sie-test", "nothing")
    loop.start()
    await _until(lambda: len(runs) == 2)
    await loop.stop()
