"""Starting with `-m`: served names, Infinity's URL prefix, readiness that waits for every -m model, and loud failures.

Fake models (bundles/test/fake.yaml) keep these fast: no weights, the real router and worker processes.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import msgspec
import pytest

from tests.server import Server, make_bundle


def bundle(tmp_path: Path) -> str:
    return str(make_bundle(tmp_path / "bundle", "fake.yaml"))


def test_a_served_model_name_answers_on_every_api_and_the_prefix_mounts_infinity(tmp_path: Path) -> None:
    srv = Server(["--bundle", bundle(tmp_path), "-m", "test/fake-dense", "--served-model-name", "my-embedder",
                  "--url-prefix", "/v1"], log=tmp_path / "log").wait_ready()
    try:
        listed = httpx.get(f"{srv.url}/v1/models").json()
        assert [m["name"] for m in listed["models"]] == ["my-embedder"] and listed["models"][0]["family"] == "fake"
        assert [m["id"] for m in httpx.get(f"{srv.url}/models").json()["data"]] == ["my-embedder"]
        native = httpx.post(f"{srv.url}/v1/encode/my-embedder", json={"items": [{"text": "x"}]})
        assert native.status_code == 200 and msgspec.msgpack.decode(native.content)["model"] == "my-embedder"
        assert httpx.post(f"{srv.url}/v1/encode/test/fake-dense", json={"items": [{"text": "x"}]}).status_code == 404
        # With --url-prefix /v1, /v1/embeddings is Infinity's exact handler (its response id, its usage) ...
        prefixed = httpx.post(f"{srv.url}/v1/embeddings", json={"model": "my-embedder", "input": ["a", "b"]})
        assert prefixed.status_code == 200 and prefixed.json()["id"].startswith("infinity-")
        assert prefixed.json()["model"] == "my-embedder" and len(prefixed.json()["data"]) == 2
        root = httpx.post(f"{srv.url}/embeddings", json={"model": "my-embedder", "input": ["a", "b"]}).json()
        assert [d["embedding"] for d in root["data"]] == [d["embedding"] for d in prefixed.json()["data"]]
        # ... while /v1/models keeps its union shape, and Infinity's models list is under the prefix too.
        assert "models" in listed and httpx.get(f"{srv.url}/v1/models").status_code == 200
    finally:
        srv.stop()


def test_without_the_prefix_v1_embeddings_stays_openai(tmp_path: Path) -> None:
    srv = Server(["--bundle", bundle(tmp_path), "-m", "test/fake-dense", "--url-prefix", "/infinity"],
                 log=tmp_path / "log").wait_ready()
    try:
        openai = httpx.post(f"{srv.url}/v1/embeddings", json={"model": "test/fake-dense", "input": "a"}).json()
        assert not openai.get("id", "").startswith("infinity-")
        prefixed = httpx.post(f"{srv.url}/infinity/embeddings", json={"model": "test/fake-dense", "input": "a"})
        assert prefixed.status_code == 200 and prefixed.json()["id"].startswith("infinity-")
        assert httpx.get(f"{srv.url}/infinity/models").json()["data"][0]["id"] == "test/fake-dense"
        assert httpx.get(f"{srv.url}/infinity/health").status_code == 404  # Infinity never prefixes /health
    finally:
        srv.stop()


def test_readiness_waits_for_every_m_model(tmp_path: Path) -> None:
    srv = Server(["--bundle", bundle(tmp_path), "-m", "test/fake-dense", "-m", "test/fake-slow-load"],
                 log=tmp_path / "log")
    try:
        deadline, seen_not_ready = time.monotonic() + 120, False
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"{srv.url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                time.sleep(0.1)
                continue
            if ready:
                break
            seen_not_ready = True
            time.sleep(0.1)
        states = {m["name"]: m["state"] for m in httpx.get(f"{srv.url}/v1/models").json()["models"]}
        assert states == {"test/fake-dense": "loaded", "test/fake-slow-load": "loaded"}
        assert seen_not_ready  # the slow model (3 s) kept it 503 for a while
    finally:
        srv.stop()


def failed_start(tmp_path: Path, *args: str) -> tuple[int, str]:
    srv = Server(["--bundle", bundle(tmp_path), *args], log=tmp_path / "log")
    try:
        srv.process.wait(timeout=180)
    finally:
        srv.stop()
    return int(srv.process.returncode), (tmp_path / "log").read_text()


def test_an_m_model_that_cannot_be_found_stops_the_server_with_one_reason(tmp_path: Path) -> None:
    code, log = failed_start(tmp_path, "-m", "test/fake-dense", "-m", "test/fake-missing-weights")
    assert code == 1 and "Traceback" not in log
    (reason,) = [line for line in log.splitlines() if "cannot start" in line]
    assert "test/fake-missing-weights" in reason and "hub download" in reason
    assert "retrying" not in log  # not found is permanent


def test_an_unknown_m_model_stops_the_server_before_it_listens(tmp_path: Path) -> None:
    code, log = failed_start(tmp_path, "-m", str(tmp_path / "no-such-folder"))
    assert code == 1 and "Traceback" not in log
    (reason,) = [line for line in log.splitlines() if "cannot start" in line]
    assert "no-such-folder" in reason and "Uvicorn running" not in log


@pytest.mark.slow
def test_a_transient_load_failure_is_retried_before_the_server_gives_up(tmp_path: Path) -> None:
    code, log = failed_start(tmp_path, "-m", "test/fake-broken")  # an engine error: maybe transient
    assert code == 1 and "/router/" not in log  # the worker logs its own traceback; the router none
    assert "attempt 1 of 2, retrying" in log and log.count("weights are corrupt (injected)") >= 3
    (reason,) = [line for line in log.splitlines() if "cannot start" in line]
    assert "test/fake-broken" in reason
