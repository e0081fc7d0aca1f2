"""A real Prometheus (the Debian package) on loopback scrapes a running SIE server under a short load; the chart's KEDA
queries and every dashboard panel's query return data through Prometheus's HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests import declared
from tests.deploy.test_chart import kinds, render
from tests.deploy.test_dashboards import DASHBOARDS, VARIABLES, exprs, load
from tests.server import Server, free_port, make_bundle

PROMETHEUS = shutil.which("prometheus")
pytestmark = declared.binary("prometheus", "apt-get install --no-install-recommends prometheus, as .ci/run does")

DENSE, E5, BROKEN = "test/fake-dense", "test/fake-e5", "test/fake-broken"
ASLEEP = "test/fake-asleep"  # in the pool map under a URL where nothing listens: a pool scaled to zero
NAMESPACE = "sie"
# The server stands in for pool "fake"; pool "asleep" is at minReplicas 0, so its ScaledObject has the wake trigger,
# fed by the requests "fake" forwards to it.
VALUES = {"keda": {"enabled": True},
          "pools": [{"name": "fake", "models": [DENSE, E5], "maxReplicas": 2},
                    {"name": "asleep", "models": [ASLEEP], "minReplicas": 0, "maxReplicas": 1}]}
SERVICE = "sie-fake"
# What Grafana sends with the `model` variable at "All" (its allValue).
LIVE_VARIABLES = {**VARIABLES, "${model}": ".*", "$model": ".*"}
# Panels that can only have data on a GPU server; none today (device memory panels show "cpu" on CPU).
GPU_ONLY: set[str] = set()


def substitute(expr: str) -> str:
    for name, value in LIVE_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


class Prometheus:
    """`prometheus` scraping one target every second, with the labels the ServiceMonitor would give it."""

    def __init__(self, folder: Path, target: str) -> None:
        self.folder = folder
        labels = {"namespace": NAMESPACE, "service": SERVICE, "pod": f"{SERVICE}-0", "pool": "fake"}
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": "sie", "static_configs": [{"targets": [target], "labels": labels}]}]}
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self._start()

    def _start(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.folder / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        assert PROMETHEUS is not None
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.folder / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.folder / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.folder)

    def wait_scraping(self, timeout: float = 30.0) -> None:
        """Until the target has been scraped and is up; started again on another port if its own was taken."""
        deadline = time.monotonic() + timeout
        restarts = 3
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.folder / "prometheus.log").read_text()
                if restarts and "address already in use" in log:
                    restarts -= 1
                    self.stop()
                    self._start()
                    continue
                raise RuntimeError(f"prometheus exited with {self.process.returncode}: {log[-2000:]}")
            try:
                result = self.query("up")
                if result and result[0]["value"][1] == "1":
                    return
            except (httpx.HTTPError, AssertionError):
                pass
            time.sleep(0.2)
        raise TimeoutError("prometheus did not scrape the SIE server")

    def api(self, path: str, **params: Any) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def _traffic(url: str, seconds: float) -> dict[int, int]:
    """Concurrent requests through several APIs for `seconds`, with 4xx and 5xx answers and one eviction."""
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    calls = [
        ("/v1/embeddings", {"model": DENSE, "input": ["one two three", "four"]}),
        ("/v1/embeddings", {"model": E5, "input": ["five six"]}),
        (f"/v1/encode/{DENSE}", {"items": [{"text": "seven"}, {"text": "eight nine"}]}),
        ("/embeddings", {"model": E5, "input": ["ten"]}),
        ("/v1/rerank", {"model": DENSE, "query": "q", "documents": ["a b", "c d", "e"]}),
        ("/v1/embeddings", {"model": DENSE, "input": []}),  # 400
        ("/v1/embeddings", {"model": BROKEN, "input": ["x"]}),  # 502: its load fails
        ("/v1/embeddings", {"model": ASLEEP, "input": ["x"]}),  # 503: forwarded to a pool with no pods
    ]

    def worker(offset: int) -> None:
        with httpx.Client(base_url=url, timeout=60, headers={"accept": "application/json"}) as client:
            i = offset
            while time.monotonic() < stop:
                path, body = calls[i % len(calls)]
                status = client.post(path, json=body).status_code
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                i += 1

    with ThreadPoolExecutor(6) as executor:
        futures = [executor.submit(worker, n) for n in range(6)]
        time.sleep(seconds / 2)
        evicted = httpx.post(f"{url}/admin/workers/{DENSE}/evict", timeout=60)
        assert evicted.status_code == 200, evicted.text
        for future in futures:
            future.result()
    return statuses


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """A server under load, scraped by Prometheus throughout, then left a few scrapes to catch up."""
    folder = tmp_path_factory.mktemp("prometheus_live")
    bundle = make_bundle(folder / "bundle", "fake.yaml")
    (folder / "pools.json").write_text(json.dumps({ASLEEP: f"http://127.0.0.1:{free_port()}"}))
    server = Server(["--bundle", str(bundle), "--preload", DENSE, "--preload", E5], log=folder / "server.log",
                    env={"SIE_POOL": "fake", "SIE_POOL_MAP": str(folder / "pools.json")})
    prometheus: Prometheus | None = None
    try:
        server.wait_ready()  # before Prometheus knows the port, which the server may have had to change
        prometheus = Prometheus(folder, f"127.0.0.1:{server.port}")
        prometheus.wait_scraping()
        time.sleep(1.0)  # a sample or two before the load, so rates and increases have a baseline
        statuses = _traffic(server.url, 3.0)
        assert statuses.get(200, 0) > 20 and statuses.get(400) and statuses.get(502) and statuses.get(503), statuses
        time.sleep(2.5)  # the last counts reach Prometheus
        yield prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        assert server.stop() in (0, -15)  # uvicorn re-raises SIGTERM once it has shut down cleanly


def test_keda_queries_from_the_chart_return_data(scraped: Prometheus) -> None:
    scaled = {so["metadata"]["name"]: so for so in kinds(render(VALUES, name="sie", namespace=NAMESPACE),
                                                         "ScaledObject")}
    triggers = {(name, t["name"]): t["metadata"]["query"] for name, so in scaled.items()
                for t in so["spec"]["triggers"]}
    assert set(triggers) == {(SERVICE, "queue-depth"), ("sie-asleep", "queue-depth"), ("sie-asleep", "wake")}
    assert f'service="{SERVICE}"' in triggers[SERVICE, "queue-depth"]
    (depth,) = scraped.query(triggers[SERVICE, "queue-depth"])
    # The load is over and every request was answered: a depth above zero now would be a count that leaked, which
    # would keep KEDA from ever scaling the pool in.
    assert float(depth["value"][1]) == 0
    (wake,) = scraped.query(triggers["sie-asleep", "wake"])
    assert float(wake["value"][1]) > 0  # requests forwarded to the pool with no pods: what wakes it


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_dashboard_query_returns_data(scraped: Prometheus, path: Path) -> None:
    dashboard = load(path)
    empty = [expr for expr in exprs(dashboard) if not scraped.query(substitute(expr)) and expr not in GPU_ONLY]
    assert empty == [], f"no data for {empty}"
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "model"]
    metric = variable["query"]["query"].removeprefix("label_values(").split(",")[0]
    models = scraped.api("label/model/values", **{"match[]": metric})
    assert {DENSE, E5, BROKEN} <= set(models)


def test_the_load_shows_in_the_series(scraped: Prometheus) -> None:
    def value(expr: str) -> float:
        (sample,) = scraped.query(expr)
        return float(sample["value"][1])

    assert value(f'sum(increase(sie_evictions_total{{model="{DENSE}",reason="admin"}}[1m]))') > 0
    assert value(f'sum(increase(sie_model_loads_total{{model="{DENSE}",result="success"}}[1m]))') > 0  # reloaded
    assert value(f'sum(sie_requests_total{{model="{BROKEN}",status="502"}})') > 0
    assert value(f'sum(sie_requests_total{{model="{DENSE}",status="400"}})') > 0
    assert value(f'sum(sie_forwarded_requests_total{{model="{ASLEEP}",status="503"}})') > 0
    assert scraped.query(f'sie_requests_total{{model="{ASLEEP}"}}') == []  # answered by no pool, so never counted
    assert value('sum(rate(sie_request_duration_seconds_count{phase="inference"}[1m]))') > 0
    assert value('sum(sie_device_memory_total_bytes{device="cpu"})') > 0
