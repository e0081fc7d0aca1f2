"""No model name from a request can make the server read an arbitrary file or fetch from a URL."""

from __future__ import annotations

import httpx
import pytest

from tests.server import Server


@pytest.mark.parametrize("name", ["/etc/passwd", "../../../../etc/passwd", "tests", "https://evil.example/model",
                                  "/work/main", "hf://sentence-transformers/all-MiniLM-L6-v2"])
def test_only_configured_models_are_reachable(server: Server, name: str) -> None:
    native = httpx.post(f"{server.url}/v1/encode/{name}", json={"items": [{"text": "x"}]})
    assert native.status_code in (404, 405) and "root:" not in native.text
    openai = httpx.post(f"{server.url}/v1/embeddings", json={"model": name, "input": "x"})
    assert openai.status_code == 404 and openai.json()["error"]["code"] == "model_not_found"
    listed = {m["name"] for m in httpx.get(f"{server.url}/v1/models").json()["models"]}
    assert name not in listed  # nothing was registered on the fly
