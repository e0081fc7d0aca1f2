"""A request whose client has gone never reaches the model; a request past its deadline gets a coded 504."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from tests.server import Server, make_bundle

MODEL = "test/fake-very-slow"


def batches_sent(url: str) -> float:
    """Batches the model's queue has sent to its worker (`sie_batch_size` counts one per batch at its send)."""
    line = f'sie_batch_size_count{{model="{MODEL}"}} '
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return next((float(row.removeprefix(line)) for row in text.splitlines() if row.startswith(line)), 0.0)


async def _scenario(url: str) -> list[object]:
    body = {"items": [{"text": "x"}]}
    async with httpx.AsyncClient(timeout=30) as patient, httpx.AsyncClient(timeout=0.5) as impatient:
        before = await asyncio.to_thread(batches_sent, url)
        first = asyncio.create_task(patient.post(f"{url}/v1/encode/{MODEL}", json=body))
        second = asyncio.create_task(patient.post(f"{url}/v1/encode/{MODEL}", json=body))
        deadline = time.monotonic() + 30
        while await asyncio.to_thread(batches_sent, url) < before + 2:  # both at the worker: the next one queues
            assert time.monotonic() < deadline, "the two batches never left"
            await asyncio.sleep(0.01)
        gone = asyncio.create_task(impatient.post(f"{url}/v1/encode/{MODEL}", json=body))
        return list(await asyncio.gather(first, second, gone, return_exceptions=True))


def test_a_disconnected_client_is_dropped_before_the_model_and_deadlines_answer_504(tmp_path: Path) -> None:
    srv = Server(["--bundle", str(make_bundle(tmp_path / "b", "fake.yaml")), "-m", MODEL, "--max-batch-items", "1"],
                 env={"SIE_REQUEST_TIMEOUT_S": "2.5"}, log=tmp_path / "log").wait_ready()
    try:
        first, second, gone = asyncio.run(_scenario(srv.url))
        assert isinstance(first, httpx.Response) and first.status_code == 200
        assert isinstance(second, httpx.Response) and second.status_code == 200
        assert isinstance(gone, httpx.TimeoutException)
        # The queue is FIFO: once a later request is answered, the abandoned one was dropped or ran before it.
        assert httpx.post(f"{srv.url}/v1/encode/{MODEL}", json={"items": [{"text": "probe"}]},
                          timeout=30).status_code == 200
        (row,) = [w for w in httpx.get(f"{srv.url}/admin/workers").json()["workers"] if w["model"] == MODEL]
        assert row["requests_served"] == 3  # the first two and the probe

        async def four_at_once() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as client:
                return list(await asyncio.gather(*(client.post(f"{srv.url}/v1/encode/{MODEL}",
                                                               json={"items": [{"text": f"t{i}"}]})
                                                   for i in range(4))))

        codes = sorted(r.status_code for r in asyncio.run(four_at_once()))
        assert codes[0] == 200 and codes[-1] == 504  # the last in line waits past the 2.5 s deadline
        late = next(r for r in asyncio.run(four_at_once()) if r.status_code == 504)
        assert late.json()["detail"]["code"] == "DEADLINE_EXCEEDED"
    finally:
        srv.stop()
