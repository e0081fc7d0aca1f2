"""CORS: closed by default; `--cors-allow-origin` (TEI) lets the listed origins in, `--permissive-cors` (Infinity) any
origin; preflights are answered before auth; credentials are never allowed."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.server import Server, make_bundle

APP = "https://app.example.com"
PREFLIGHT = {"access-control-request-method": "POST", "access-control-request-headers": "authorization,content-type"}


def start(tmp_path_factory: pytest.TempPathFactory, *flags: str) -> Server:
    folder = tmp_path_factory.mktemp("cors")
    return Server(["--bundle", str(make_bundle(folder / "bundle", "fake.yaml")), "--api-key", "k", *flags]).wait_ready()


@pytest.fixture(scope="module")
def listed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start(tmp_path_factory, "--cors-allow-origin", APP, "--cors-allow-origin", "http://localhost:3000")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def permissive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start(tmp_path_factory, "--permissive-cors")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.parametrize("path", ["/v1/encode/test/fake-dense", "/v1/embeddings", "/embed", "/rerank"])
def test_preflights_of_inference_routes_are_answered_for_a_listed_origin(listed: Server, path: str) -> None:
    response = httpx.options(f"{listed.url}{path}", headers={"origin": APP, **PREFLIGHT})
    assert response.status_code == 200  # no API key: a preflight never carries one
    assert response.headers["access-control-allow-origin"] == APP
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "authorization" in response.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in response.headers


def test_a_listed_origin_reads_answers_and_an_unlisted_one_gets_no_grant(listed: Server) -> None:
    body = {"model": "test/fake-dense", "input": "x"}
    auth = {"authorization": "Bearer k"}
    ok = httpx.post(f"{listed.url}/v1/embeddings", json=body, headers={"origin": APP, **auth}, timeout=60)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == APP
    assert "x-request-id" in ok.headers["access-control-expose-headers"]
    assert "origin" in ok.headers["vary"].lower()
    other = httpx.post(f"{listed.url}/v1/embeddings", json=body,
                       headers={"origin": "https://evil.example", **auth})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    refused = httpx.options(f"{listed.url}/v1/encode/test/fake-dense",
                            headers={"origin": "https://evil.example", **PREFLIGHT})
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    unauthorized = httpx.post(f"{listed.url}/v1/embeddings", json=body, headers={"origin": APP})
    assert unauthorized.status_code == 401 and unauthorized.headers["access-control-allow-origin"] == APP


def test_permissive_allows_any_origin_never_with_credentials(permissive: Server) -> None:
    preflight = httpx.options(f"{permissive.url}/v1/embeddings", headers={"origin": "https://any.example",
                                                                          **PREFLIGHT})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "*"
    simple = httpx.get(f"{permissive.url}/v1/models", headers={"origin": "https://any.example",
                                                               "authorization": "Bearer k", "cookie": "session=1"})
    assert simple.headers["access-control-allow-origin"] == "*"
    assert all("access-control-allow-credentials" not in r.headers for r in (preflight, simple))


def test_closed_by_default(tmp_path_factory: pytest.TempPathFactory) -> None:
    srv = start(tmp_path_factory)
    try:
        preflight = httpx.options(f"{srv.url}/v1/encode/test/fake-dense", headers={"origin": APP, **PREFLIGHT})
        assert preflight.status_code == 401 and "access-control-allow-origin" not in preflight.headers  # no key
        simple = httpx.get(f"{srv.url}/healthz", headers={"origin": APP})
        assert "access-control-allow-origin" not in simple.headers
    finally:
        srv.stop()
