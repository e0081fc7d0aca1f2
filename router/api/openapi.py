"""The OpenAPI document served at `/openapi.json`, and a `/docs` page (router process).

Request schemas come from the msgspec Structs the handlers decode with; paths, summaries and auth come from the
route table (`api.routes`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from sie_router import __version__
from sie_router.api.endpoint import Access, Endpoint
from sie_router.errors import Api

REF = "#/components/schemas/{name}"
_TEXTS = {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}}]}
_TOKEN_IDS = [{"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
              {"type": "array", "minItems": 1,
               "items": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}}]


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


def request_schemas(endpoints: Sequence[Endpoint]) -> dict[str, Any]:
    """JSON schemas of every request body, keyed by Struct name, with `$ref`s into `components/schemas`."""
    bodies = [e.doc.body for e in endpoints if e.doc.body is not None]
    bodies += [body for e in endpoints for body in e.doc.mentions]
    _, schemas = msgspec.json.schema_components(list(dict.fromkeys(bodies)), ref_template=REF,
                                                schema_hook=lambda kind: {"description": "any JSON value"})
    schemas["EmbeddingsRequest"]["properties"]["input"] = {
        "description": "a text, a list of texts, or cl100k_base token-id arrays",
        "oneOf": [*_TEXTS["oneOf"], *_TOKEN_IDS]}
    schemas["EmbeddingsRequest"]["required"] = ["input"]
    schemas["ClassifyRequest"]["properties"]["input"] = {"description": "a text or a list of texts", **_TEXTS}
    schemas["ClassifyRequest"]["required"] = ["input"]
    return dict(schemas)


def _operation(endpoint: Endpoint, path: str, secured: bool) -> dict[str, Any]:
    doc, method = endpoint.doc, endpoint.method
    out: dict[str, Any] = {"summary": doc.summary, "tags": [doc.tag],
                           "operationId": re.sub(r"[^a-z0-9]+", "_", f"{method} {path}".lower()).strip("_")}
    params = re.findall(r"{(\w+)}", path)
    if params:
        out["parameters"] = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"},
                              "description": "the model id, slashes kept as they are (for example BAAI/bge-m3)"}
                             for name in params]
    if doc.body is not None:
        schema = {"$ref": REF.format(name=doc.body.__name__)}
        content = {"application/json": {"schema": schema}}
        if doc.msgpack:
            content["application/msgpack"] = {"schema": schema}
        out["requestBody"] = {"required": True, "content": content}
    answers: dict[str, Any] = {"application/msgpack": {}, "application/json": {}} if doc.msgpack else {doc.answer: {}}
    out["responses"] = {"200": {"description": "success", "content": answers}}
    name, statuses = _ERRORS[endpoint.api]
    if doc.body is None and endpoint.access is not Access.ADMIN:
        statuses = ("401", "404") if secured else ("404",)
    for status in statuses:
        out["responses"][status] = {"description": "error", "content": {
            "application/json": {"schema": {"$ref": REF.format(name=name)}}}}
    if secured:
        out["security"] = [{"adminToken": []}] if endpoint.access is Access.ADMIN else [{"apiKey": []}]
    return out


def document(endpoints: Sequence[Endpoint], *, api_key: bool, admin_token: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 document for these routes (3.1, so msgspec's JSON Schema is used as it is)."""
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        path = re.sub(r"{(\w+):\w+}", r"{\1}", endpoint.path)
        secured = {Access.OPEN: False, Access.KEY: api_key, Access.ADMIN: admin_token or api_key}[endpoint.access]
        paths.setdefault(path, {})[endpoint.method.lower()] = _operation(endpoint, path, secured)
    return {
        "openapi": "3.1.0",
        "info": {"title": "SIE", "version": __version__,
                 "description": "Embeddings, reranking and extraction for many small models behind one server: the "
                                "native SIE API (msgpack or JSON), and OpenAI- and Infinity-compatible routes."},
        "paths": paths,
        "components": {"schemas": {**request_schemas(endpoints), **_ERROR_SCHEMAS},
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


def encoded(endpoints: Sequence[Endpoint], *, api_key: bool, admin_token: bool) -> bytes:
    return msgspec.json.encode(document(endpoints, api_key=api_key, admin_token=admin_token))
