"""OpenTelemetry traces across the router and its workers, seen by a loopback OTLP/HTTP receiver: a request continues
its client's trace, its queue wait and batch are spans of it, the worker's phases are children of the batch (the
context crossed ZeroMQ inside the batch message), and a batch serving several traces links to each."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.otlp_receiver import Receiver, Span, start_receiver
from tests.server import ROOT, Server, make_bundle

WORKER_PHASES = ("sie.worker.tokenize", "sie.worker.forward", "sie.worker.postprocess")
# A model whose every batch takes a while, so requests sent meanwhile share the next batch.
BUSY = """sie_id: test/fake-busy
package_backed: true
tasks: {encode: {dense: {dim: 16}}}
profiles: {default: {adapter: fake, adapter_options: {loadtime: {dim: 16, batch_delay_s: 0.4}}}}
"""


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    started = start_receiver()
    try:
        yield started
    finally:
        started.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("tracing")
    bundle = make_bundle(folder / "bundle", "fake.yaml")
    (bundle / "busy.yaml").write_text(BUSY)
    # OTEL_BSP_SCHEDULE_DELAY: the SDK's batch processors (router and workers) export every 100 ms, not every 5 s.
    srv = Server(["--bundle", str(bundle), "--preload", "test/fake-dense", "--preload", "test/fake-busy",
                  "--otlp-endpoint", receiver.endpoint, "--otlp-service-name", "sie-test"],
                 env={"OTEL_BSP_SCHEDULE_DELAY": "100"})
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def traceparent() -> tuple[str, str, str]:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{parent_id}-01", trace_id, parent_id


def named(spans: list[Span], name: str) -> list[Span]:
    return [s for s in spans if s.name == name]


def test_one_request_yields_its_spans_in_its_clients_trace(server: Server, receiver: Receiver) -> None:
    header, trace_id, parent_id = traceparent()
    response = httpx.post(f"{server.url}/v1/encode/test/fake-dense", json={"items": [{"text": "a"}, {"text": "b"}]},
                          headers={"traceparent": header, "accept": "application/json"})
    assert response.status_code == 200

    def complete(spans: list[Span]) -> bool:
        names = {s.name for s in spans if s.trace_id == trace_id}
        return {"sie.queue", "sie.batch", *WORKER_PHASES} <= names and any(n.startswith("POST") for n in names)

    spans = [s for s in receiver.wait_for(complete) if s.trace_id == trace_id]
    (request,) = [s for s in spans if s.name.startswith("POST")]
    assert request.name == "POST /v1/encode/{model:path}" and request.parent_id == parent_id
    assert request.attributes["http.route"] == "/v1/encode/{model:path}"
    assert request.attributes["sie.model"] == "test/fake-dense" and request.attributes["sie.inputs"] == 2
    assert request.attributes["http.response.status_code"] == 200
    assert request.attributes["sie.request_id"] == response.headers["x-request-id"]
    (wait,) = named(spans, "sie.queue")
    (batch,) = named(spans, "sie.batch")
    assert wait.parent_id == request.span_id and batch.parent_id == request.span_id
    assert batch.links == [(trace_id, wait.span_id)] and batch.attributes["sie.batch.items"] == 2
    assert wait.end_ns <= batch.start_ns
    router = request.resource
    for phase in WORKER_PHASES:
        (span,) = named(spans, phase)
        assert span.parent_id == batch.span_id, phase
        assert span.resource["sie.process"] == "worker" and span.resource["sie.model"] == "test/fake-dense"
        assert span.resource["process.pid"] != router["process.pid"]
        assert span.resource["service.name"] == router["service.name"] == "sie-test"
    assert router["sie.process"] == "router"


def test_a_request_without_traceparent_starts_a_new_trace(server: Server, receiver: Receiver) -> None:
    response = httpx.post(f"{server.url}/v1/encode/test/fake-dense", json={"items": [{"text": "c"}]},
                          headers={"x-request-id": "no-parent-1"})
    assert response.status_code == 200

    def found(spans: list[Span]) -> bool:
        return any(s.attributes.get("sie.request_id") == "no-parent-1" for s in spans)

    (request,) = [s for s in receiver.wait_for(found) if s.attributes.get("sie.request_id") == "no-parent-1"]
    assert request.parent_id == "" and len(request.trace_id) == 32
    receiver.wait_for(lambda spans: any(s.name == "sie.worker.forward" and s.trace_id == request.trace_id
                                        for s in spans))


def test_a_batch_serving_several_traces_links_to_each(server: Server, receiver: Receiver) -> None:
    url = f"{server.url}/v1/encode/test/fake-busy"
    headers = [traceparent() for _ in range(5)]
    with ThreadPoolExecutor(len(headers)) as pool:  # the first batches keep the worker busy; the rest queue together
        answers = list(pool.map(lambda h: httpx.post(url, json={"items": [{"text": h[1]}]},
                                                     headers={"traceparent": h[0]}, timeout=30), headers))
    assert all(a.status_code == 200 for a in answers)
    traces = {h[1] for h in headers}

    def shared_batch(spans: list[Span]) -> bool:
        return any(len({t for t, _ in s.links} & traces) >= 2 for s in named(spans, "sie.batch"))

    spans = receiver.wait_for(shared_batch)
    batch = next(s for s in named(spans, "sie.batch") if len({t for t, _ in s.links} & traces) >= 2)
    waits = {(s.trace_id, s.span_id) for s in named(spans, "sie.queue")}
    assert set(batch.links) <= waits  # each link is the queue wait of one of the requests it served
    assert batch.attributes["sie.batch.requests"] == len(batch.links)
    assert batch.trace_id in {t for t, _ in batch.links}  # the child of its first request, in that trace
    receiver.wait_for(lambda spans: any(s.name == "sie.worker.forward" and s.parent_id == batch.span_id
                                        for s in spans))


def test_tracing_off_imports_no_opentelemetry(tmp_path: Path) -> None:
    """Off by default, and free: building the app and importing the hot path (router and worker) loads nothing of
    OpenTelemetry."""
    code = """
import sys
from sie_router.__main__ import settings_from
from sie_router.app import build_app
from sie_router.models.registry import build_registry
import sie_worker.loop
settings = settings_from(["--bundle", sys.argv[1]])
assert settings.otlp_endpoint is None
app = build_app(settings, build_registry(settings.bundle, (), (), offline=True))
import shutil; shutil.rmtree(app.state.sie.pool.supervisor.client.folder)
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""
    bundle = make_bundle(tmp_path / "bundle", "fake.yaml")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code, str(bundle)], capture_output=True, text=True, cwd=ROOT, env=env,
                         check=True).stdout
    assert out.strip() == "[]"
