"""Overload at about 4x what the queue holds: only successes and coded, retryable refusals; bounded queue and RSS."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import psutil
import pytest

from tests.server import Server, make_bundle

QUEUE = 16
CLIENTS = 4 * QUEUE


@pytest.fixture(scope="module")
def small_queue_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("overload")
    srv = Server(["--bundle", str(make_bundle(folder / "b", "fake.yaml")), "-m", "test/fake-slow",
                  "--max-batch-items", "4"], env={"SIE_MAX_CONCURRENT_REQUESTS": str(QUEUE)},
                 log=folder / "log").wait_ready()
    try:
        yield srv
    finally:
        srv.stop()


async def _flood(url: str, path: str, body: dict, seconds: float) -> tuple[Counter, int]:
    outcomes: Counter = Counter()
    peak = 0

    async def client(http: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            response = await http.post(url + path, json=body)
            code = None if response.status_code == 200 else response.headers.get("x-sie-error-code")
            retry_after = response.headers.get("retry-after")
            outcomes[(response.status_code, code, retry_after is not None)] += 1

    async def watch(http: httpx.AsyncClient) -> None:
        nonlocal peak
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            stats = (await http.get(url + "/models")).json()["data"][0]["stats"]
            peak = max(peak, stats["queue_absolute"])
            await asyncio.sleep(0.05)

    limits = httpx.Limits(max_connections=CLIENTS + 4)
    async with httpx.AsyncClient(timeout=10, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(CLIENTS)), watch(http))
    return outcomes, peak


@pytest.mark.parametrize(("path", "body", "refusal"), [
    ("/v1/encode/test/fake-slow", {"items": [{"text": "load"}]}, (503, "QUEUE_FULL", True)),
    ("/v1/embeddings", {"model": "test/fake-slow", "input": "load"}, (429, "QUEUE_FULL", True)),
])
def test_overload_gives_only_successes_and_coded_retryable_refusals(small_queue_server: Server, path: str,
                                                                     body: dict, refusal: tuple) -> None:
    router = psutil.Process(small_queue_server.process.pid)
    rss_before = router.memory_info().rss
    outcomes, peak = asyncio.run(_flood(small_queue_server.url, path, body, seconds=4))
    assert set(outcomes) <= {(200, None, False), refusal}, outcomes
    assert outcomes[(200, None, False)] > 0 and outcomes[refusal] > 0, outcomes
    assert peak <= QUEUE
    assert router.memory_info().rss < rss_before + 64 * 2**20
