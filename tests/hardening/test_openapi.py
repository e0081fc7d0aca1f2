"""`/openapi.json` describes every route in the app's route list, with request schemas and the auth in force."""

from __future__ import annotations

import re

import httpx
from starlette.routing import Route

from sie_router.api.openapi import OPERATIONS, document
from sie_router.api.routes import ADMIN_PREFIX, OPEN_PATHS, ROUTES
from tests.hardening.conftest import Hardened


def test_every_route_has_a_written_operation() -> None:
    for route in ROUTES:
        assert isinstance(route, Route)
        path = re.sub(r"{(\w+):\w+}", r"{\1}", route.path)
        for method in (route.methods or set()) - {"HEAD"}:
            assert (method, path) in OPERATIONS, f"{method} {path} is not described in router/api/openapi.py"


def test_served_document_covers_the_routes_and_the_auth(hardened: Hardened) -> None:
    served = httpx.get(f"{hardened.url}/openapi.json").json()
    assert served == document(ROUTES, api_key=True, admin_token=True, open_paths=OPEN_PATHS, admin_prefix=ADMIN_PREFIX)
    assert served["openapi"].startswith("3.1")
    encode = served["paths"]["/v1/encode/{model}"]["post"]
    assert encode["security"] == [{"apiKey": []}]
    assert set(encode["requestBody"]["content"]) == {"application/json", "application/msgpack"}
    assert served["paths"]["/admin/workers"]["get"]["security"] == [{"adminToken": []}]
    assert "security" not in served["paths"]["/healthz"]["get"]
    schemas = served["components"]["schemas"]
    assert schemas["EncodeRequest"]["required"] == ["items"]
    assert schemas["EmbeddingsRequest"]["required"] == ["input"]
    assert {"Item", "ScoreRequest", "ExtractRequest", "RerankRequest", "ClassifyRequest"} <= set(schemas)
    assert "swagger-ui" in httpx.get(f"{hardened.url}/docs").text


def test_document_without_secrets_has_no_security() -> None:
    doc = document(ROUTES, api_key=False, admin_token=False, open_paths=OPEN_PATHS,
                   admin_prefix=ADMIN_PREFIX)
    assert all("security" not in op for methods in doc["paths"].values() for op in methods.values())
