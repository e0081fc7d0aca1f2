"""No redirects: a path or method that does not exist is a JSON 404 or 405 in the envelope of the API it is under
(a client following a 307 would resend a POST without its body)."""

from __future__ import annotations

import httpx
import pytest

from tests.server import Server


@pytest.mark.parametrize(("method", "path", "status"), [
    ("POST", "/v1/encode", 404),
    ("POST", "/v1/score", 404),
    ("POST", "/nowhere", 404),
    ("GET", "/v1/encode/test/fake-dense", 405),
    ("DELETE", "/v1/models", 405),
])
def test_native_paths_answer_json_in_the_native_envelope(server: Server, method: str, path: str, status: int) -> None:
    response = httpx.request(method, f"{server.url}{path}", json={"items": [{"text": "x"}]})
    assert response.status_code == status and not response.is_redirect
    assert response.headers["content-type"] == "application/json"
    code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}[status]
    assert response.json()["detail"]["code"] == code and response.headers["x-sie-error-code"] == code


@pytest.mark.parametrize(("method", "path", "status"), [
    ("POST", "/v1/embeddings/", 404),
    ("GET", "/v1/embeddings", 405),
    ("PUT", "/v1/rerank", 405),
])
def test_openai_paths_answer_in_the_openai_envelope(server: Server, method: str, path: str, status: int) -> None:
    response = httpx.request(method, f"{server.url}{path}", json={"model": "test/fake-dense", "input": "x"})
    assert response.status_code == status and not response.is_redirect
    error = response.json()["error"]
    assert error["code"] == {404: "not_found", 405: "method_not_allowed"}[status] and error["message"]


@pytest.mark.parametrize(("method", "path", "status"), [("POST", "/embeddings/", 404), ("GET", "/rerank", 405)])
def test_infinity_paths_answer_in_the_infinity_envelope(server: Server, method: str, path: str, status: int) -> None:
    response = httpx.request(method, f"{server.url}{path}", json={"model": "test/fake-dense", "input": ["x"]})
    assert response.status_code == status and not response.is_redirect
    assert response.json()["error"]["code"] == status
