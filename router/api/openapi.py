"""The OpenAPI document served at `/openapi.json`, and a `/docs` page (router process).

Request schemas come from the msgspec Structs the handlers decode with; paths come from the app's route list.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from sie_router import __version__
from sie_router.api.classify import ClassifyRequest
from sie_router.api.embeddings import EmbeddingsRequest
from sie_router.api.rerank import RerankRequest
from sie_router.api.tei_bodies import (
    EmbedRequest,
    PredictRequest,
    SimilarityRequest,
    TEIDecodeRequest,
    TEIRerankRequest,
    TEITokenizeRequest,
    VertexRequest,
)
from sie_router.errors import Api
from sie_sdk.types import DecodeRequest, EncodeRequest, ExtractRequest, ScoreRequest, TokenizeRequest

REF = "#/components/schemas/{name}"
# TEI's bodies are listed under components only: its operations name them in their summaries, not as requestBody.
_BODIES: tuple[type, ...] = (EncodeRequest, ScoreRequest, ExtractRequest, EmbeddingsRequest, RerankRequest,
                             ClassifyRequest, EmbedRequest, PredictRequest, TEIRerankRequest, SimilarityRequest,
                             TEITokenizeRequest, TEIDecodeRequest, VertexRequest, TokenizeRequest, DecodeRequest)
_TEXTS = {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}}]}
_TOKEN_IDS = [{"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
              {"type": "array", "minItems": 1,
               "items": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}}]


@dataclass(frozen=True)
class Op:
    """One documented operation: a summary, its tag, its request Struct and the error envelope it answers in."""

    summary: str
    tag: str
    body: type | None = None
    api: Api = Api.NATIVE
    msgpack: bool = False
    answer: str = "application/json"


OPERATIONS: dict[tuple[str, str], Op] = {
    ("POST", "/v1/encode/{model}"): Op("Encode items: dense, sparse or multivector", "native", EncodeRequest,
                                       msgpack=True),
    ("POST", "/v1/{op}/{model}"): Op("`/v1/tokenize/{model}`: the model's own tokens and counts for texts "
                                     "(TokenizeRequest); `/v1/decode/{model}`: token ids back to text "
                                     "(DecodeRequest)", "native"),
    ("POST", "/v1/score/{model}"): Op("Score items against a query (rerank)", "native", ScoreRequest, msgpack=True),
    ("POST", "/v1/extract/{model}"): Op("Extract entities, labels or structure from items", "native",
                                        ExtractRequest, msgpack=True),
    ("GET", "/v1/models"): Op("List models (SIE `models` and OpenAI `data`)", "native"),
    ("GET", "/v1/models/{model}"): Op("Describe one model", "native"),
    ("POST", "/v1/embeddings"): Op("OpenAI-compatible embeddings", "openai", EmbeddingsRequest, Api.OPENAI),
    ("POST", "/v1/rerank"): Op("Cohere/Jina-style rerank", "openai", RerankRequest, Api.OPENAI),
    ("POST", "/embeddings"): Op("Infinity-compatible embeddings", "infinity", EmbeddingsRequest, Api.INFINITY),
    ("POST", "/rerank"): Op("Rerank: Infinity's body (`documents`) or TEI's (`texts`, TEIRerankRequest), each "
                            "answered in its shape",
                            "infinity", RerankRequest, Api.INFINITY),
    ("POST", "/classify"): Op("Infinity-compatible classification", "infinity", ClassifyRequest, Api.INFINITY),
    ("POST", "/v1/classify"): Op("Infinity-compatible classification", "infinity", ClassifyRequest, Api.INFINITY),
    ("GET", "/models"): Op("Infinity-compatible model list", "infinity", api=Api.INFINITY),
    ("GET", "/health"): Op("Infinity health: `{\"unix\": <time>}`", "health", api=Api.INFINITY),
    ("GET", "/healthz"): Op("Liveness: `ok` while the process runs", "health", answer="text/plain"),
    ("GET", "/readyz"): Op("Readiness: `ok` once the startup models are loaded, else 503", "health",
                           answer="text/plain"),
    ("GET", "/metrics"): Op("Prometheus metrics: Infinity's HTTP metric names and the `sie_*` metrics", "health",
                            answer="text/plain"),
    ("GET", "/admin/workers"): Op("Workers, their memory and queues, and the device ledger", "admin"),
    ("POST", "/admin/workers/{model}/evict"): Op("Evict a model's worker", "admin"),
    ("GET", "/openapi.json"): Op("This document", "meta"),
    ("POST", "/{route}"): Op("TEI at the root, by the default model of each type: `/embed` (EmbedRequest), "
                             "`/embed_sparse`, `/embed_all` (424), `/predict` (PredictRequest), `/similarity` "
                             "(SimilarityRequest), `/tokenize` (TEITokenizeRequest), `/decode` (TEIDecodeRequest), "
                             "`/vertex` (VertexRequest), `/` and `/invocations` (the default model's route); and each "
                             "under `/tei/{model}/`, answered by that model", "tei", api=Api.TEI),
    ("GET", "/{route}"): Op("TEI: `/info` (the default model's), `/` and `/ping` (health, empty body); and "
                            "`/tei/{model}/info`, `/health`, `/ping`", "tei", api=Api.TEI),
    ("GET", "/docs"): Op("Interactive API documentation", "meta", answer="text/html"),
}

_ERRORS: dict[Api, tuple[str, tuple[str, ...]]] = {
    Api.NATIVE: ("NativeError", ("400", "401", "404", "413", "500", "502", "503")),
    Api.OPENAI: ("OpenAIError", ("400", "401", "404", "413", "429", "500", "502", "503")),
    Api.INFINITY: ("InfinityError", ("400", "401", "413", "422", "429", "500", "502", "503")),
    Api.TEI: ("TEIError", ("400", "404", "422", "424", "429", "503")),
}

_ERROR_SCHEMAS: dict[str, Any] = {
    "NativeError": {"type": "object", "required": ["detail"], "properties": {"detail": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "param": {"type": "string"}}}}},
    "OpenAIError": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}},
    "InfinityError": {"description": "Handler errors are `{\"error\": {..., \"code\": <int>}}`; validation errors are "
                      "422 `{\"detail\": [...]}`; auth errors are 401 `{\"detail\": \"Unauthorized\"}`.",
                      "type": "object"},
    "TEIError": {"description": "`{\"error\", \"error_type\"}`; a body that does not fit the schema is a "
                 "plain-text 422, auth errors are 401 with an empty body.", "type": "object",
                 "required": ["error", "error_type"],
                 "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}}},
}


def request_schemas() -> dict[str, Any]:
    """JSON schemas of every request body, keyed by Struct name, with `$ref`s into `components/schemas`."""
    _, schemas = msgspec.json.schema_components(_BODIES, ref_template=REF,
                                                schema_hook=lambda kind: {"description": "any JSON value"})
    schemas["EmbeddingsRequest"]["properties"]["input"] = {
        "description": "a text, a list of texts, or cl100k_base token-id arrays",
        "oneOf": [*_TEXTS["oneOf"], *_TOKEN_IDS]}
    schemas["EmbeddingsRequest"]["required"] = ["input"]
    schemas["ClassifyRequest"]["properties"]["input"] = {"description": "a text or a list of texts", **_TEXTS}
    schemas["ClassifyRequest"]["required"] = ["input"]
    return dict(schemas)


def _operation(method: str, path: str, op: Op, secured: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"summary": op.summary, "tags": [op.tag],
                           "operationId": re.sub(r"[^a-z0-9]+", "_", f"{method} {path}".lower()).strip("_")}
    params = re.findall(r"{(\w+)}", path)
    if params:
        out["parameters"] = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"},
                              "description": "the model id, slashes kept as they are (for example BAAI/bge-m3)"}
                             for name in params]
    if op.body is not None:
        schema = {"$ref": REF.format(name=op.body.__name__)}
        content = {"application/json": {"schema": schema}}
        if op.msgpack:
            content["application/msgpack"] = {"schema": schema}
        out["requestBody"] = {"required": True, "content": content}
    answers: dict[str, Any] = {"application/msgpack": {}, "application/json": {}} if op.msgpack else {op.answer: {}}
    out["responses"] = {"200": {"description": "success", "content": answers}}
    name, statuses = _ERRORS[op.api]
    if op.body is None and op.tag != "admin":
        statuses = ("401", "404") if secured else ("404",)
    for status in statuses:
        out["responses"][status] = {"description": "error", "content": {
            "application/json": {"schema": {"$ref": REF.format(name=name)}}}}
    if secured:
        out["security"] = [{"adminToken": []}] if op.tag == "admin" else [{"apiKey": []}]
    return out


def document(routes: Sequence[BaseRoute], *, api_key: bool, admin_token: bool, open_paths: frozenset[str],
             admin_prefix: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document for these routes (3.1, so msgspec's JSON Schema is used as it is)."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route):
            continue
        path = re.sub(r"{(\w+):\w+}", r"{\1}", route.path)
        for method in sorted((route.methods or set()) - {"HEAD"}):
            op = OPERATIONS.get((method, path)) or Op((route.endpoint.__doc__ or route.name).strip().split("\n")[0],
                                                     "other")
            admin = path.startswith(admin_prefix)
            secured = (admin_token or api_key) if admin else api_key and path not in open_paths
            paths.setdefault(path, {})[method.lower()] = _operation(method, path, op, bool(secured))
    return {
        "openapi": "3.1.0",
        "info": {"title": "SIE", "version": __version__,
                 "description": "Embeddings, reranking and extraction for many small models behind one server: the "
                                "native SIE API (msgpack or JSON), and OpenAI- and Infinity-compatible routes."},
        "paths": paths,
        "components": {"schemas": {**request_schemas(), **_ERROR_SCHEMAS},
                       "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer",
                                                      "description": "SIE_API_KEY / --api-key"},
                                           "adminToken": {"type": "http", "scheme": "bearer",
                                                          "description": "SIE_ADMIN_TOKEN / --admin-token"}}},
    }


async def openapi_json(request: Request) -> Response:
    """This server's OpenAPI document."""
    body: bytes = request.app.state.openapi
    return Response(body, media_type="application/json")


_DOCS = """<!doctype html>
<html><head><title>SIE API</title><meta charset="utf-8">
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});</script>
</body></html>"""


async def docs(request: Request) -> Response:
    """Swagger UI over `/openapi.json` (the page loads its script from a CDN, as FastAPI's does)."""
    return HTMLResponse(_DOCS)


def encoded(routes: Sequence[BaseRoute], *, api_key: bool, admin_token: bool, open_paths: frozenset[str],
            admin_prefix: str) -> bytes:
    return msgspec.json.encode(document(routes, api_key=api_key, admin_token=admin_token, open_paths=open_paths,
                                        admin_prefix=admin_prefix))
