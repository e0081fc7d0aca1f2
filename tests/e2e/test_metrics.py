"""`/metrics`: the sie_* series the chart and dashboards use, plus Infinity's http_* names, fed by real traffic."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.server import MINILM, Server


def _value(text: str, name: str, default: float | None = None, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    if default is not None:
        return default
    raise AssertionError(f"no sample {name} {labels}")


def test_metrics_follow_traffic(server: Server) -> None:
    before = httpx.get(f"{server.url}/metrics").text
    start = _value(before, "sie_requests_total", 0.0, model=MINILM, endpoint="openai_embeddings", status="200")
    for _ in range(3):
        assert httpx.post(f"{server.url}/v1/embeddings", json={"model": MINILM, "input": ["a b c", "d"]}).status_code \
            == 200
    assert httpx.post(f"{server.url}/v1/embeddings", json={"model": MINILM, "input": []}).status_code == 400
    response = httpx.get(f"{server.url}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert _value(text, "sie_requests_total", model=MINILM, endpoint="openai_embeddings", status="200") == start + 3
    assert _value(text, "sie_requests_total", model=MINILM, endpoint="openai_embeddings", status="400") >= 1
    assert _value(text, "sie_queue_depth", model=MINILM) == 0
    assert _value(text, "sie_tokens_total", model=MINILM) > 0
    assert _value(text, "sie_batch_size_count", model=MINILM) > 0
    assert _value(text, "sie_request_duration_seconds_count", model=MINILM, endpoint="encode", phase="inference") > 0
    assert _value(text, "sie_request_duration_seconds_count", model=MINILM, endpoint="encode", phase="queue") > 0
    assert _value(text, "sie_request_duration_seconds_count", model=MINILM, endpoint="openai_embeddings",
                  phase="total") >= 3
    assert _value(text, "sie_models_loaded", device="cpu") >= 1
    assert _value(text, "sie_model_loads_total", model=MINILM, result="success") >= 1
    assert _value(text, "sie_model_memory_bytes", model=MINILM, device="cpu") > 100 * 2**20
    assert _value(text, "sie_device_memory_total_bytes", device="cpu") > 0
    assert _value(text, "http_requests_total", handler="/v1/embeddings", method="POST", status="2xx") >= 3
    assert re.search(r'^sie_evictions_total\{model="test/fake-a",reason="idle"\} 0\.0$', text, re.M)


def test_the_router_reports_its_own_process_and_collects_garbage_rarely(server: Server) -> None:
    """process_* and python_gc_* are the router's. Its startup heap is frozen and young collections are spaced out
    (`sie_router.__main__._settle_heap`): 300 concurrent requests cost about one collection (28 at CPython's
    defaults, measured when this test was written)."""
    def gen0(text: str) -> float:
        return _value(text, "python_gc_collections_total", generation="0")

    def embed(i: int) -> int:
        return httpx.post(f"{server.url}/v1/embeddings", json={"model": MINILM, "input": [f"request {i}"]}).status_code

    before = httpx.get(f"{server.url}/metrics").text
    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(embed, range(300))) == {200}
    after = httpx.get(f"{server.url}/metrics").text
    assert gen0(after) - gen0(before) <= 10, (gen0(before), gen0(after))
    unlabelled = dict(re.findall(r"^(process_\w+) (\S+)$", after, re.M))
    assert float(unlabelled["process_cpu_seconds_total"]) > 0
    assert float(unlabelled["process_resident_memory_bytes"]) > 50 * 2**20
