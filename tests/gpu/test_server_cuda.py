"""The whole server on a GPU (`make test-gpu`): a model served on cuda with its VRAM reported, two models sharing
one GPU with eviction by VRAM, and the bench on --device cuda."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from sie_router.pool.devices import NvmlDevices
from tests.sentences import SENTENCES
from tests.server import MINILM, ROOT, Server, make_bundle

pytestmark = pytest.mark.gpu
MiB = 2**20
COPY = "test/minilm-copy"


def workers(srv: Server) -> dict[str, dict]:
    return {row["model"]: row for row in httpx.get(f"{srv.url}/admin/workers", timeout=10).json()["workers"]}


def embed(srv: Server, model: str) -> None:
    response = httpx.post(f"{srv.url}/v1/embeddings", json={"model": model, "input": SENTENCES[:4]}, timeout=300)
    assert response.status_code == 200, response.text


def test_server_on_cuda_serves_and_reports_gpu_memory(tmp_path: Path) -> None:
    srv = Server(["--bundle", str(make_bundle(tmp_path / "b", "all-minilm-l6-v2.yaml")), "-m", MINILM,
                  "--device", "cuda"], log=tmp_path / "log").wait_ready()
    try:
        embed(srv, MINILM)
        row = workers(srv)[MINILM]
        assert row["device"].startswith("cuda:")
        # NVML's per-process figure, or (in a container without hostPID) torch's figure plus the measured context.
        assert row["memory_bytes"] is not None and row["memory_bytes"] > 100 * MiB
        metrics = httpx.get(f"{srv.url}/metrics").text
        load_s = [line for line in metrics.splitlines() if line.startswith("sie_model_load_duration_seconds_sum")]
        print(f"VRAM per worker: {row['memory_bytes'] / MiB:.0f} MiB on {row['device']}; cold start: {load_s}")
    finally:
        srv.stop()


def test_two_models_share_one_gpu_and_evict_each_other_by_vram(tmp_path: Path) -> None:
    """A 2 GiB budget and a 1900 MiB estimate for each: one model's measured VRAM (context included) plus the other's
    estimate overflow it, so loading either evicts the other; each fits alone."""
    bundle = make_bundle(tmp_path / "b", "all-minilm-l6-v2.yaml")
    text = (bundle / "all-minilm-l6-v2.yaml").read_text().replace("memory_mb: 400", "memory_mb: 1900")
    (bundle / "all-minilm-l6-v2.yaml").write_text(text)
    (bundle / "copy.yaml").write_text(text.replace(f"sie_id: {MINILM}", f"sie_id: {COPY}"))
    total = NvmlDevices().snapshot()[0].total
    srv = Server(["--bundle", str(bundle), "--device", "cuda", "--gpu-memory-fraction", f"{2048 * MiB / total:.6f}"],
                 env={"CUDA_VISIBLE_DEVICES": "0"}, log=tmp_path / "log").wait_ready()
    try:
        embed(srv, MINILM)
        embed(srv, COPY)
        loaded = {model for model, row in workers(srv).items() if row["state"] == "loaded"}
        assert loaded == {COPY}
        embed(srv, MINILM)
        loaded = {model for model, row in workers(srv).items() if row["state"] == "loaded"}
        assert loaded == {MINILM}
        metrics = httpx.get(f"{srv.url}/metrics").text
        for model in (MINILM, COPY):
            assert f'sie_evictions_total{{model="{model}",reason="memory"}} 1.0' in metrics
    finally:
        srv.stop()


def test_bench_on_cuda(tmp_path: Path) -> None:
    """`make bench ARGS='--device cuda'` in its quick form: our server on the GPU against the bare model there, no
    errors, every vector within the bench's cosine bound. For Infinity's torch engine beside it, run the full bench."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "bench/run.py", "--quick", "--device", "cuda", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    runs = [r for shape in rows["ours"]["runs"].values() for r in shape]
    assert runs and all(r["errors"] == 0 and r["min_cos"] >= 0.999 for r in runs)
