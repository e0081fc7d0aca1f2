"""The OpenAPI document served at `/openapi.json`, and a `/docs` page whose Swagger UI assets this server serves
(router process).

Request schemas come from the msgspec Structs the handlers decode with; paths, summaries and auth come from the
route table (`api.routes`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import swagger_ui_bundle
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response

from sie_router import __version__
from sie_router.api.endpoint import Access, Endpoint
from sie_router.errors import Api, SIEError
from sie_sdk.codes import ErrorCode

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


# Swagger UI's built assets, from the `swagger-ui-bundle-v2` distribution (installed with the router): the page and
# everything it loads come from this server, so /docs works on an air-gapped cluster. Paths are relative to `/docs`.
SWAGGER_UI = Path(str(swagger_ui_bundle.swagger_ui_path))
DOCS_ASSETS = {"swagger-ui.css": "text/css", "swagger-ui-bundle.js": "text/javascript",
               "favicon-32x32.png": "image/png", "favicon-16x16.png": "image/png"}

# validatorUrl null: Swagger UI would otherwise fetch a badge from its public validator.
_DOCS = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>SIE API</title>
<link rel="stylesheet" href="docs/swagger-ui.css">
<link rel="icon" type="image/png" href="docs/favicon-32x32.png" sizes="32x32">
<link rel="icon" type="image/png" href="docs/favicon-16x16.png" sizes="16x16"></head>
<body><div id="ui"></div>
<script src="docs/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "openapi.json", dom_id: "#ui", validatorUrl: null, deepLinking: true});</script>
</body></html>"""


async def docs(request: Request) -> Response:
    """Swagger UI over `/openapi.json`, with its assets served by this server (`docs_asset`)."""
    return HTMLResponse(_DOCS)


async def docs_asset(request: Request) -> Response:
    """One of Swagger UI's files; the name is checked against `DOCS_ASSETS`, never joined to a path unchecked."""
    name = request.path_params["asset"]
    if name not in DOCS_ASSETS:
        raise SIEError(ErrorCode.NOT_FOUND, f"no documentation asset {name!r}")
    return FileResponse(SWAGGER_UI / name, media_type=DOCS_ASSETS[name],
                        headers={"Cache-Control": "public, max-age=86400"})


def encoded(endpoints: Sequence[Endpoint], *, api_key: bool, admin_token: bool) -> bytes:
    return msgspec.json.encode(document(endpoints, api_key=api_key, admin_token=admin_token))
