"""The route table (`api.routes`) is the one list of routes: the app serves it, and the envelope of errors, who may
call a path, the URL prefix and the OpenAPI document all derive from it. The expectations below are the lists each
layer kept for itself before the table, so that deriving them changed nothing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sie_router.api.endpoint import Access
from sie_router.api.routes import ENDPOINTS, ROUTES, access_of, api_of, prefixed_paths
from sie_router.errors import Api

ROUTER = Path(__file__).resolve().parent.parent / "router"


def test_each_route_is_one_entry_of_the_table() -> None:
    assert [(e.path, e.method) for e in ENDPOINTS] == [(r.path, *(r.methods or set()) - {"HEAD"}) for r in ROUTES]
    assert all(e.doc.summary and e.doc.tag for e in ENDPOINTS)


@pytest.mark.parametrize(("path", "api"), [
    ("/v1/embeddings", Api.OPENAI), ("/v1/rerank", Api.OPENAI), ("/v1/embeddings/x", Api.OPENAI),
    ("/embeddings", Api.INFINITY), ("/embeddings/", Api.INFINITY), ("/rerank", Api.INFINITY),
    ("/classify", Api.INFINITY), ("/v1/classify", Api.INFINITY), ("/models", Api.INFINITY),
    ("/health", Api.INFINITY),
    ("/", Api.TEI), ("/embed", Api.TEI), ("/embed/", Api.TEI), ("/embed_sparse", Api.TEI), ("/embed_all", Api.TEI),
    ("/predict", Api.TEI), ("/similarity", Api.TEI), ("/tokenize", Api.TEI), ("/decode", Api.TEI),
    ("/info", Api.TEI), ("/invocations", Api.TEI), ("/vertex", Api.TEI), ("/ping", Api.TEI),
    ("/tei/BAAI/bge-m3/embed", Api.TEI), ("/tei/x", Api.TEI),
    ("/v1/encode/m", Api.NATIVE), ("/v1/models", Api.NATIVE), ("/healthz", Api.NATIVE), ("/metrics", Api.NATIVE),
    ("/admin/workers", Api.NATIVE), ("/nowhere", Api.NATIVE), ("//", Api.NATIVE),
])
def test_the_envelope_of_a_path(path: str, api: Api) -> None:
    assert api_of(path) is api


@pytest.mark.parametrize(("method", "path", "access"), [
    *(("GET", p, Access.OPEN) for p in ("/healthz", "/readyz", "/health", "/metrics", "/openapi.json", "/docs",
                                         "/ping", "/", "/tei/BAAI/bge-m3/health", "/tei/m/ping")),
    ("POST", "/ping", Access.OPEN), ("POST", "/healthz", Access.OPEN), ("POST", "/tei/m/health", Access.OPEN),
    ("POST", "/", Access.KEY), ("GET", "/info", Access.KEY), ("POST", "/tei/m/embed", Access.KEY),
    ("POST", "/v1/encode/m", Access.KEY), ("GET", "/v1/models", Access.KEY), ("GET", "/nowhere", Access.KEY),
    ("GET", "/admin/workers", Access.ADMIN), ("POST", "/admin/workers/m/evict", Access.ADMIN),
    ("GET", "/admin", Access.ADMIN), ("GET", "/admin/unknown", Access.ADMIN),
])
def test_who_may_call_a_path(method: str, path: str, access: Access) -> None:
    assert access_of(method, path) is access


def test_the_url_prefix_covers_infinitys_routes_and_keeps_the_model_listing() -> None:
    assert prefixed_paths("/v1") == {"/v1/embeddings": "/embeddings", "/v1/rerank": "/rerank",
                                     "/v1/classify": "/classify"}
    assert prefixed_paths("/api") == {"/api/embeddings": "/embeddings", "/api/rerank": "/rerank",
                                      "/api/classify": "/classify", "/api/models": "/models"}


def test_no_other_module_lists_route_paths() -> None:
    """A route path written outside the table is a second list that drifts; TEI's route names live in `api.tei`."""
    static = {e.path for e in ENDPOINTS if "{" not in e.path}
    prefixes = {e.path.split("{")[0] for e in ENDPOINTS if "{" in e.path} - {"/"}
    found = []
    for path in sorted(ROUTER.rglob("*.py")):
        if path == ROUTER / "api" / "routes.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                    node.value.rstrip("/") in static or node.value in prefixes):
                found.append(f"{path.relative_to(ROUTER)}:{node.lineno}: {node.value!r}")
    assert not found, "route paths outside api/routes.py:\n" + "\n".join(found)
