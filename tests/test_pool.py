"""The worker pool without worker processes: slots driven by the test, for what needs no real worker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from sie_router.models.registry import build_registry
from sie_router.pool import pool as pool_module
from sie_router.pool.devices import detect
from sie_router.pool.pool import ModelState, WorkerPool
from sie_router.pool.supervisor import Worker
from sie_router.settings import Settings

MODEL = "test/fake-dense"


class GoneProcess:
    """A worker process that has already exited: stopping it is a no-op."""

    pid = 0

    def is_alive(self) -> bool:
        return False

    def terminate(self) -> None: ...
    def kill(self) -> None: ...
    def join(self, timeout: float) -> None: ...


@pytest.fixture
async def pool(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[WorkerPool]:
    monkeypatch.setattr(pool_module, "IDLE_CHECK_S", 0.01)
    started = WorkerPool(Settings(bundle="test", idle_ttl_s=0.05), build_registry("test", (), (), offline=True),
                         detect("cpu"))
    await started.start()
    yield started
    await started.shutdown()


def loaded(pool: WorkerPool, key: str) -> Worker:
    """A slot that looks loaded, its worker last used long ago."""
    worker = Worker(worker_id="w", key=key, process=GoneProcess(), device="cpu")  # type: ignore[arg-type]
    worker.last_used = time.monotonic() - 60
    pool.placement.reserve(key, "cpu", 1)
    slot = pool.slots[key]
    slot.state, slot.worker = ModelState.LOADED, worker
    return worker


async def test_the_idle_evictor_survives_an_exception_and_evicts_again(pool: WorkerPool,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    real, failures = pool._evictable, []

    def flaky(key: str) -> bool:
        if not failures:
            failures.append(key)
            raise RuntimeError("injected")
        return real(key)

    pool._evictable = flaky  # type: ignore[method-assign]
    loaded(pool, MODEL)
    async with asyncio.timeout(5):
        while pool.slots[MODEL].worker is not None:  # evicted by the restarted loop
            await asyncio.sleep(0.01)
    assert failures and pool.slots[MODEL].state == ModelState.AVAILABLE
    assert "idle eviction" in caplog.text and "injected" in caplog.text
    assert f"model '{failures[0]}'" in caplog.text  # the exception names the model it was checking
