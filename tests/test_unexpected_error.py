"""An unhandled error in the router answers a coded 500 in the API's envelope that still names the request: the id
an operator greps the log for (the response comes from Starlette's outermost middleware, outside RequestContext)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from sie_router.__main__ import settings_from
from sie_router.app import build_app
from sie_router.models.registry import build_registry
from tests.server import make_bundle


class _BrokenRegistry:
    """Every read of the served models fails as a bug would."""

    @property
    def served(self) -> dict:
        raise RuntimeError("a bug in the registry")

    def __getattr__(self, name: str) -> object:
        raise RuntimeError("a bug in the registry")


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = settings_from(["--bundle", str(make_bundle(tmp_path / "bundle", "fake.yaml"))])
    app = build_app(settings, build_registry(settings.bundle, (), (), offline=True))
    with TestClient(app, raise_server_exceptions=False) as client:  # the lifespan starts and stops the pool
        registry, app.state.sie.registry = app.state.sie.registry, _BrokenRegistry()
        yield client
        app.state.sie.registry = registry  # for the shutdown


@pytest.mark.parametrize(("path", "status", "code_of"), [
    ("/v1/models", 500, lambda body: body["detail"]["code"]),  # the native envelope
    ("/models", 500, lambda body: body["error"]["code"]),  # Infinity's (OpenAI-style) envelope
    ("/info", 424, lambda body: body["error_type"]),  # TEI answers a backend failure 424
])
def test_a_500_carries_the_request_id_and_a_code(client: TestClient, path: str, status: int, code_of) -> None:
    given = client.get(path, headers={"X-Request-Id": "op-grep-me-42"})
    assert given.status_code == status
    assert given.headers["x-request-id"] == "op-grep-me-42"
    assert given.headers["x-sie-error-code"] == "INTERNAL_ERROR"
    assert code_of(given.json()) in ("INTERNAL_ERROR", 500, "Backend")
    fresh = client.get(path)
    assert fresh.status_code == status and len(fresh.headers["x-request-id"]) == 32
