"""`/openapi.json` describes every route in the route table, with request schemas and the auth in force."""

from __future__ import annotations

import httpx

from sie_router.api.openapi import document
from sie_router.api.routes import ENDPOINTS
from tests.hardening.conftest import Hardened


def test_served_document_covers_the_routes_and_the_auth(hardened: Hardened) -> None:
    served = httpx.get(f"{hardened.url}/openapi.json").json()
    assert served == document(ENDPOINTS, api_key=True, admin_token=True)
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
    doc = document(ENDPOINTS, api_key=False, admin_token=False)
    assert all("security" not in op for methods in doc["paths"].values() for op in methods.values())
