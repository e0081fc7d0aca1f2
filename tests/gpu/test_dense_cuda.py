"""The GPU path of the dense adapter (`make test-gpu`): fp16/bf16 on CUDA, pinned transfers, warm-up at load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sie_worker.adapters import build_adapter
from sie_worker.protocol import EncodeBatch, InputItem, WorkerSpec
from tests.sentences import SENTENCES
from tests.server import MINILM, Server, make_bundle

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["float16", "bfloat16", None])
def test_cuda_dense_matches_the_cpu_reference(minilm_dir: Path, reference_model, precision: str | None) -> None:  # type: ignore[no-untyped-def]
    spec = WorkerSpec(worker_id="gpu", model=MINILM, adapter="dense", weights_dir=str(minilm_dir),
                      to_worker_endpoint="", from_worker_endpoint="", device="cuda:0", compute_precision=precision,
                      max_sequence_length=256)
    adapter = build_adapter(spec)
    adapter.load()
    batch = EncodeBatch(batch_id=1, items=[InputItem(text=t) for t in SENTENCES], output_types=["dense"])
    result = adapter.forward(adapter.prepare(batch))
    assert result.dense is not None
    got = result.dense.numpy()
    want = reference_model.encode(SENTENCES, normalize_embeddings=True)
    assert float(np.min(np.sum(got * want, axis=1))) >= 0.999
    adapter.close()


def test_server_on_cuda_serves_and_reports_gpu_memory(tmp_path: Path) -> None:
    import httpx

    srv = Server(["--bundle", str(make_bundle(tmp_path / "b", "all-minilm-l6-v2.yaml")), "-m", MINILM,
                  "--device", "cuda"], log=tmp_path / "log").wait_ready()
    try:
        response = httpx.post(f"{srv.url}/v1/embeddings", json={"model": MINILM, "input": SENTENCES[:4]})
        assert response.status_code == 200
        (row,) = httpx.get(f"{srv.url}/admin/workers").json()["workers"]
        assert row["device"].startswith("cuda:") and row["memory_bytes"] > 0
    finally:
        srv.stop()
