"""The GPU path's process behaviour, checked on the CPU: a broken CUDA context ends its worker, which the pool
restarts after its back-off; `--device cuda` on a host without a GPU stops at once with one sentence."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from tests.server import ROOT, Server, free_port, make_bundle

MODEL = "test/fake-cuda-fault"  # from its second batch on, every batch raises a CUDA illegal-address error


def encode(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/encode/{MODEL}", json={"items": [{"text": "x"}]}, timeout=60)


def worker_row(url: str) -> dict:
    rows = httpx.get(f"{url}/admin/workers", timeout=10).json()["workers"]
    return next((row for row in rows if row["model"] == MODEL), {})


def serve_once(url: str, deadline_s: float = 60.0) -> httpx.Response:
    """The first 200 for the model, polling through its (re)load."""
    deadline = time.monotonic() + deadline_s
    while True:
        response = encode(url)
        if response.status_code == 200 or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


def test_a_cuda_error_ends_the_worker_and_the_pool_restarts_it_after_its_back_off(tmp_path: Path) -> None:
    srv = Server(["--bundle", str(make_bundle(tmp_path / "b", "fake.yaml"))], log=tmp_path / "log").wait_ready()
    try:
        assert serve_once(srv.url).status_code == 200
        first_pid = worker_row(srv.url)["pid"]
        # Batch 2: the injected CUDA error. The worker flushes its BatchFailed before it exits (worker/loop.py), and
        # the router reads it before failing the worker's calls: the batch's own error, not the worker's exit.
        failed = encode(srv.url)
        assert failed.status_code == 500
        assert failed.json()["detail"]["code"] == "INFERENCE_ERROR"
        assert "illegal memory access" in failed.json()["detail"]["message"]
        deadline = time.monotonic() + 30
        while psutil_alive(first_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not psutil_alive(first_pid), "a worker whose CUDA context broke must exit"
        assert serve_once(srv.url).status_code == 200  # restarted: its batch 1 again
        row = worker_row(srv.url)
        assert row["pid"] != first_pid and row["state"] == "loaded"
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert f'sie_worker_restarts_total{{model="{MODEL}"}} 1.0' in metrics
        assert "CUDA error, exiting for a restart" in srv.log_tail()
    finally:
        srv.stop()


def psutil_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_device_cuda_without_a_gpu_exits_at_once_with_one_sentence() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a GPU machine
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "sie_router", "serve", "--device", "cuda", "--bundle", "test",
                           "--port", str(free_port())], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert time.monotonic() - started < 30
    output = done.stdout + done.stderr
    assert "Traceback" not in output
    (line,) = [line for line in output.splitlines() if "ERROR" in line]
    # Why in brackets: NVML's own words (no library on a CPU host; no usable GPU among an empty list on a GPU host).
    assert "cannot start: --device cuda was given, but no GPU can be used here (" in line and line.endswith(")")
