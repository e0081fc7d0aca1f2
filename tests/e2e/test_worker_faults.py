"""The worker boundary through the real server: a hung worker (SIGSTOP) under load, an undecodable frame, a code the
router does not know, a transient load failure, a slow but progressing big request, and OOM recovery by splitting.

Deadlines are short here (SIE_BATCH_TIMEOUT_S), so each scenario takes seconds."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from sie_worker.adapters.fake import fake_vector
from tests.server import Server, make_bundle

BATCH_TIMEOUT_S = 5.0  # the cap, and the deadline while a worker's pace is unknown
FLOOR_S = 2.0
LOAD_SLACK_S = 30.0  # a fake worker loads in well under a second; a busy 2-core machine can stretch that a lot

MODELS = """
sie_id: test/hang-a
package_backed: true
tasks: {encode: {dense: {dim: 16}}}
profiles: {default: {adapter: fake, adapter_options: {loadtime: {dim: 16}}}}
---
sie_id: test/hang-b
package_backed: true
tasks: {encode: {dense: {dim: 16}}}
profiles: {default: {adapter: fake, adapter_options: {loadtime: {dim: 16}}}}
---
sie_id: test/bad-frame
package_backed: true
tasks: {encode: {dense: {dim: 16}}}
profiles: {default: {adapter: fake, adapter_options: {loadtime: {dim: 16}}}}
---
sie_id: test/unknown-code
package_backed: true
tasks: {encode: {dense: {dim: 16}}}
profiles: {default: {adapter: fake, adapter_options: {loadtime: {dim: 16}}}}
---
sie_id: test/garbage
package_backed: true
tasks: {encode: {dense: {dim: 16}}}
profiles: {default: {adapter: fake, adapter_options: {loadtime: {dim: 16}}}}
---
sie_id: test/flaky-load
package_backed: true
tasks: {encode: {dense: {dim: 16}}}
profiles: {default: {adapter: fake, adapter_options: {loadtime: {dim: 16, fail_loads: 1, fail_loads_file: COUNTER}}}}
---
sie_id: test/oom-over-4
package_backed: true
tasks: {encode: {dense: {dim: 16}}}
profiles: {default: {adapter: fake, adapter_options: {loadtime: {dim: 16, oom_over_items: 4}}}}
---
sie_id: test/per-item
package_backed: true
tasks: {encode: {dense: {dim: 16}}}
profiles: {default: {adapter: fake, adapter_options: {loadtime: {dim: 16, batch_delay_per_item_s: 0.003}}}}
"""


@dataclass
class Faulty:
    server: Server
    log: Path

    @property
    def url(self) -> str:
        return self.server.url


def start(folder: Path, env: dict[str, str], preload: tuple[str, ...] = ("test/hang-a", "test/hang-b")) -> Server:
    bundle = make_bundle(folder / "bundle", "fake.yaml")
    (bundle / "faults.yaml").write_text(MODELS.replace("COUNTER", str(folder / "load-count")))
    return Server(["--bundle", str(bundle), *(f"--preload={m}" for m in preload)],
                  env=env, log=folder / "server.log").wait_ready()


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faulty]:
    folder = tmp_path_factory.mktemp("faulty")
    srv = start(folder, {"SIE_BATCH_TIMEOUT_S": str(BATCH_TIMEOUT_S), "SIE_BATCH_TIMEOUT_FLOOR_S": str(FLOOR_S),
                         "SIE_LOAD_RETRY_COOLDOWN_S": "1",
                         "SIE_WORKER_FAULT": ",".join(["bad_frame:test/bad-frame", "unknown_code:test/unknown-code",
                                                       "garbage:test/garbage"])})
    try:
        yield Faulty(srv, folder / "server.log")
    finally:
        srv.stop()


def worker_pid(url: str, model: str) -> int | None:
    for row in httpx.get(f"{url}/admin/workers").json()["workers"]:
        if row["model"] == model and row["state"] == "loaded":
            return int(row["pid"])
    return None


def encode_waiting(url: str, model: str, text: str = "x", timeout: float = 60) -> httpx.Response:
    """Encode, retrying MODEL_LOADING as a client would, until a final answer."""
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.post(f"{url}/v1/encode/{model}", json={"items": [{"text": text}]},
                              headers={"accept": "application/json"}, timeout=60)
        if response.status_code != 503 or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


@dataclass
class Answer:
    model: str
    status: int
    code: str | None
    retry_after: str | None
    seconds: float


async def _load(url: str, models: list[str], stop: asyncio.Event, answers: list[Answer]) -> None:
    """Four clients per model, each sending requests back to back until `stop` is set; `answers` grows as they come."""
    async with httpx.AsyncClient(timeout=60) as client:
        async def one_client(model: str, n: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                started = time.monotonic()
                r = await client.post(f"{url}/v1/encode/{model}", json={"items": [{"text": f"{n} {i}"}]},
                                      headers={"accept": "application/json"})
                code = r.json()["detail"]["code"] if r.status_code != 200 else None
                answers.append(Answer(model, r.status_code, code, r.headers.get("retry-after"),
                                      time.monotonic() - started))
                if r.status_code != 200:
                    await asyncio.sleep(0.05)  # as a client honouring a (shortened) Retry-After

        await asyncio.gather(*(one_client(m, n) for m in models for n in range(4)))


async def until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def test_a_stopped_worker_is_killed_at_its_deadline_and_replaced_while_the_other_model_serves(faulty: Faulty) -> None:
    url = faulty.url
    victim = worker_pid(url, "test/hang-a")
    assert victim is not None and worker_pid(url, "test/hang-b") is not None

    def served(model: str, answers: list[Answer]) -> int:
        return sum(a.model == model and a.status == 200 for a in answers)

    async def scenario() -> tuple[list[Answer], float, int]:
        stop, answers = asyncio.Event(), list[Answer]()
        load = asyncio.create_task(_load(url, ["test/hang-a", "test/hang-b"], stop, answers))
        await until(lambda: served("test/hang-a", answers) >= 5 and served("test/hang-b", answers) >= 5)
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.monotonic()
        deadline = stopped_at + BATCH_TIMEOUT_S + LOAD_SLACK_S
        replacement = None
        while replacement in (None, victim) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            replacement = await asyncio.to_thread(worker_pid, url, "test/hang-a")
        back_after = time.monotonic() - stopped_at
        since = len(answers)
        await until(lambda: served("test/hang-a", answers[since:]) >= 5)  # requests on the new worker
        stop.set()
        await load
        return answers, back_after, replacement or 0

    try:
        answers, back_after, replacement = asyncio.run(scenario())
    finally:
        if psutil.pid_exists(victim):
            os.kill(victim, signal.SIGCONT)
    other = [a for a in answers if a.model == "test/hang-b"]
    assert other and all(a.status == 200 for a in other)
    hung = [a for a in answers if a.model == "test/hang-a"]
    failed = [a for a in hung if a.status != 200]
    assert failed, "the stopped worker must have held requests"
    assert {(a.status, a.code) for a in failed} == {(503, "MODEL_LOADING")}
    # Retry-After: the back-off left (at least 1 s) while the worker is replaced, 5 s while the new one loads.
    assert {a.retry_after for a in failed} <= {"1", "5"}
    # None waits longer than the batch deadline (plus the hop and a busy machine's scheduling).
    assert max(a.seconds for a in hung) < BATCH_TIMEOUT_S + 5
    assert replacement not in (0, victim) and back_after < BATCH_TIMEOUT_S + LOAD_SLACK_S
    assert hung[-1].status == 200  # served again by the new worker
    assert not psutil.pid_exists(victim)
    log = faulty.log.read_text()
    assert "killing the worker for test/hang-a" in log  # at its batch deadline or its ping's, whichever came first
    assert "made no progress" in log or "did not answer a ping" in log
    metrics = httpx.get(f"{url}/metrics").text
    assert 'sie_worker_hangs_total{model="test/hang-a"} 1.0' in metrics
    assert 'sie_worker_hangs_total{model="test/hang-b"} 0.0' in metrics


def test_an_undecodable_frame_is_dropped_and_every_model_keeps_serving(faulty: Faulty) -> None:
    first = encode_waiting(faulty.url, "test/bad-frame", "hello")  # its worker sends garbage before this reply
    assert first.status_code == 200
    np.testing.assert_allclose(first.json()["items"][0]["dense"]["values"], fake_vector("hello", 16), rtol=1e-6)
    assert "dropping an undecodable frame from worker" in faulty.log.read_text()
    for model in ("test/bad-frame", "test/hang-b"):
        assert encode_waiting(faulty.url, model).status_code == 200


def test_a_worker_that_keeps_sending_garbage_is_restarted(faulty: Faulty) -> None:
    """Its worker sends an undecodable frame before every reply: the third within a minute gets it killed."""
    assert encode_waiting(faulty.url, "test/garbage").status_code == 200
    first = worker_pid(faulty.url, "test/garbage")
    answers = [httpx.post(f"{faulty.url}/v1/encode/test/garbage", json={"items": [{"text": "x"}]}, timeout=60)
               for _ in range(2)]
    assert [r.status_code for r in answers] == [200, 503]
    assert answers[1].json()["detail"]["code"] == "MODEL_LOADING" and "undecodable" in answers[1].text
    assert encode_waiting(faulty.url, "test/garbage").status_code == 200  # a new worker
    assert worker_pid(faulty.url, "test/garbage") not in (None, first)
    assert 'sie_worker_hangs_total{model="test/garbage"} 1.0' in httpx.get(f"{faulty.url}/metrics").text


def test_a_code_the_router_does_not_know_is_a_coded_500(faulty: Faulty) -> None:
    first = encode_waiting(faulty.url, "test/unknown-code")
    assert first.status_code == 500
    detail = first.json()["detail"]
    assert detail["code"] == "INTERNAL_ERROR" and "cannot read" in detail["message"]
    assert first.headers["x-sie-error-code"] == "INTERNAL_ERROR"
    assert encode_waiting(faulty.url, "test/unknown-code").status_code == 200  # the worker was not harmed
    assert "Traceback" not in faulty.log.read_text()


def test_a_transient_load_failure_retries_after_the_cooldown_without_an_operator(faulty: Faulty) -> None:
    url = f"{faulty.url}/v1/encode/test/flaky-load"
    response = encode_waiting(faulty.url, "test/flaky-load")
    assert response.status_code == 502 and "retry-after" not in response.headers
    detail = response.json()["detail"]
    assert detail["code"] == "MODEL_LOAD_FAILED" and detail["error_class"] == "STORAGE"
    assert detail["permanent"] is False and "Too many open files" in detail["message"]
    info = httpx.get(f"{faulty.url}/v1/models/test/flaky-load").json()
    assert info["state"] == "failed" and info["last_error"]["permanent"] is False
    deadline = time.monotonic() + 60
    while response.status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.3)
        response = httpx.post(url, json={"items": [{"text": "x"}]}, headers={"accept": "application/json"})
    assert response.status_code == 200


def test_a_batch_that_runs_out_of_memory_is_split_until_it_fits(faulty: Faulty) -> None:
    texts = [f"text {i}" for i in range(10)]
    response = httpx.post(f"{faulty.url}/v1/encode/test/oom-over-4", json={"items": [{"text": t} for t in texts]},
                          headers={"accept": "application/json"}, timeout=60)
    deadline = time.monotonic() + 30
    while response.status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
        response = httpx.post(f"{faulty.url}/v1/encode/test/oom-over-4",
                              json={"items": [{"text": t} for t in texts]}, headers={"accept": "application/json"})
    assert response.status_code == 200
    for item, text in zip(response.json()["items"], texts, strict=True):
        np.testing.assert_allclose(item["dense"]["values"], fake_vector(text, 16), rtol=1e-6)
    assert "ran out of memory on a batch of 10; running it in halves" in faulty.log.read_text()


def test_a_big_request_that_makes_progress_is_not_killed(tmp_path: Path) -> None:
    """2048 inputs in batches of 512 that take ~1.5 s each (3 ms an item). The first two leave together while the
    worker's pace is unknown (deadline: the 2.5 s cap); the second waits for the first, so timed from its send it
    would outlive the cap. Later batches are past the 1 s floor, and their deadline follows the learned pace."""
    srv = start(tmp_path, {"SIE_BATCH_TIMEOUT_S": "2.5", "SIE_BATCH_TIMEOUT_FLOOR_S": "1",
                           "SIE_MAX_BATCH_ITEMS": "512"}, preload=("test/per-item",))
    try:
        pid = worker_pid(srv.url, "test/per-item")
        texts = [f"input number {i}" for i in range(2048)]
        response = httpx.post(f"{srv.url}/v1/encode/test/per-item", json={"items": [{"text": t} for t in texts]},
                              headers={"accept": "application/json"}, timeout=120)
        assert response.status_code == 200, response.text
        for item, text in zip(response.json()["items"][::256], texts[::256], strict=True):
            np.testing.assert_allclose(item["dense"]["values"], fake_vector(text, 16), rtol=1e-6)
        assert worker_pid(srv.url, "test/per-item") == pid
        assert "killing the worker" not in srv.log_path.read_text()
    finally:
        srv.stop()
