"""`--json-output`: every log line of the router, uvicorn's access log and every worker is one JSON object, with the
model, request id and trace id where there is one; a request's id comes from `X-Request-Id` or is made, and echoed."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.server import Server, make_bundle

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("logs")
    srv = Server(["--bundle", str(make_bundle(folder / "bundle", "fake.yaml")), "--json-output", "--access-log"],
                 log=folder / "server.log")
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def lines(server: Server) -> list[dict[str, Any]]:
    """Every line the server and its workers wrote, each parsed as JSON (a line that is not one fails the test)."""
    return [json.loads(line) for line in server.log_path.read_text().splitlines() if line.strip()]


def wait_for_line(server: Server, match: Any, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [entry for entry in lines(server) if match(entry)]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no such log line in {lines(server)[-10:]}")


def test_a_clients_request_id_is_echoed_and_names_the_requests_log_lines(server: Server) -> None:
    # The model is cold: its load is logged by the router and by its new worker, within this request (the OpenAI
    # route holds it while the model loads).
    response = httpx.post(f"{server.url}/v1/embeddings", json={"model": "test/fake-dense", "input": "x"},
                          headers={"x-request-id": "req-42", "traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"},
                          timeout=60)
    assert response.status_code == 200 and response.headers["x-request-id"] == "req-42"
    access = wait_for_line(server, lambda e: e["logger"] == "uvicorn.access" and e.get("request_id") == "req-42")
    assert access["path"] == "/v1/embeddings" and access["status"] == 200 and access["method"] == "POST"
    assert access["trace_id"] == TRACE_ID and access["model"] == "test/fake-dense"
    load = wait_for_line(server, lambda e: e["logger"] == "sie.pool" and e["message"].startswith("loading "))
    assert (load["request_id"], load["model"], load["trace_id"]) == ("req-42", "test/fake-dense", TRACE_ID)
    worker = wait_for_line(server, lambda e: e["logger"] == "sie.worker")
    assert worker["model"] == "test/fake-dense" and "request_id" not in worker  # a worker serves batches
    for entry in lines(server):
        assert {"time", "level", "logger", "message"} <= set(entry), entry
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", entry["time"])


def test_a_request_without_a_usable_id_gets_one(server: Server) -> None:
    made = httpx.get(f"{server.url}/v1/models").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    replaced = httpx.get(f"{server.url}/v1/models", headers={"x-request-id": "bad id\twith spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["x-request-id"])
    error = httpx.post(f"{server.url}/v1/encode/no/such-model", json={"items": [{"text": "x"}]},
                       headers={"x-request-id": "req-404"})
    assert error.status_code == 404 and error.headers["x-request-id"] == "req-404"  # errors carry it too
    wait_for_line(server, lambda e: e.get("request_id") == "req-404" and e.get("status") == 404)
