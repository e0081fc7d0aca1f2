"""Model lifecycle through the real server: cold loads, load failures, worker faults, clean shutdown."""

from __future__ import annotations

import contextlib
import time

import httpx

from sie_sdk import ModelLoadFailedError, SIEClient
from sie_sdk.types import Item
from tests.server import Server


def test_cold_model_answers_503_model_loading_then_serves(server: Server) -> None:
    first = httpx.post(f"{server.url}/v1/encode/test/fake-slow-load", json={"items": [{"text": "x"}]})
    assert first.status_code == 503 and first.headers["retry-after"] == "5"
    assert first.json()["detail"]["code"] == "MODEL_LOADING"
    state = httpx.get(f"{server.url}/v1/models/test/fake-slow-load").json()["state"]
    assert state == "loading"
    with SIEClient(server.url) as client:
        assert client.encode("test/fake-slow-load", Item(text="x"))["dense"].shape == (16,)


def test_openai_route_waits_for_a_cold_load(server: Server) -> None:
    response = httpx.post(f"{server.url}/v1/embeddings", json={"model": "test/fake-e5", "input": "x"}, timeout=60)
    assert response.status_code == 200


def test_load_failure_is_502_without_retry_after(server: Server) -> None:
    response = httpx.post(f"{server.url}/v1/encode/test/fake-broken", json={"items": [{"text": "x"}]})
    deadline = time.monotonic() + 30
    while response.status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
        response = httpx.post(f"{server.url}/v1/encode/test/fake-broken", json={"items": [{"text": "x"}]})
    assert response.status_code == 502 and "retry-after" not in response.headers
    assert "corrupt" in response.json()["detail"]["message"]
    info = httpx.get(f"{server.url}/v1/models/test/fake-broken").json()
    assert info["state"] == "failed" and info["last_error"]["message"]
    started = time.monotonic()
    with SIEClient(server.url) as client, contextlib.suppress(ModelLoadFailedError):
        client.encode("test/fake-broken", Item(text="x"))
    assert time.monotonic() - started < 5  # no retry loop


def test_missing_weights_fail_with_every_place_tried(server: Server) -> None:
    response = httpx.post(f"{server.url}/v1/embeddings", json={"model": "test/fake-missing-weights", "input": "x"},
                          timeout=60)
    assert response.status_code == 502 and response.headers["x-should-retry"] == "false"
    message = response.json()["error"]["message"]
    assert "Hugging Face cache" in message and "hub download" in message


def test_injected_oom_is_retryable_503_and_the_worker_keeps_serving(server: Server) -> None:
    url = f"{server.url}/v1/encode/test/fake-oom"
    response = httpx.post(url, json={"items": [{"text": "x"}]})
    deadline = time.monotonic() + 30
    while response.json()["detail"]["code"] == "MODEL_LOADING" and time.monotonic() < deadline:
        time.sleep(0.2)
        response = httpx.post(url, json={"items": [{"text": "x"}]})
    assert response.status_code == 503 and response.json()["detail"]["code"] == "RESOURCE_EXHAUSTED"
    assert "retry-after" in response.headers
    assert httpx.post(url, json={"items": [{"text": "x"}]}).status_code == 200


def test_sigterm_stops_every_worker(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.server import make_bundle

    srv = Server(["--bundle", str(make_bundle(tmp_path / "b", "fake.yaml")), "-m", "test/fake-dense",
                  "-m", "test/fake-e5"], log=tmp_path / "log").wait_ready()
    pids = [p.pid for p in srv.children()]
    assert len(pids) >= 2
    # uvicorn re-raises the SIGTERM it handled once shutdown is done, so -15 is a clean exit here.
    assert srv.stop() in (0, -15)  # stop() raises if any worker outlives the router


def test_a_server_whose_port_was_taken_starts_again_on_another(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The harness's answer to a port lost between choosing it and binding it (it turned CI red once)."""
    import socket

    from tests import server as harness

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        truly_free = harness.free_port
        monkeypatch.setattr(harness, "free_port", lambda: next(ports, None) or truly_free())
        srv = Server(["--bundle", str(harness.make_bundle(tmp_path / "b", "fake.yaml"))], log=tmp_path / "log")
        try:
            assert srv.port == taken
            srv.wait_ready()
            assert srv.port != taken and httpx.get(f"{srv.url}/readyz").status_code == 200
            assert "address already in use" in (tmp_path / "log").read_text()
        finally:
            assert srv.stop() in (0, -15)
