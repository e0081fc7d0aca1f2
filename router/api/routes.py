"""The route table (router process): every route the server answers, once, with the facts the layers around the
handlers read from it: the API whose envelope its errors use, who may call it, where it names its model, whether
Infinity's URL prefix applies, and its OpenAPI description. Auth, forwarding, the prefix, metrics, error rendering
and the OpenAPI document all derive from `ENDPOINTS`."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from sie_router.api import admin, classify, embeddings, health, infinity, native, openapi, rerank, tei
from sie_router.api.endpoint import Access, Doc, Endpoint, ModelAt
from sie_router.api.state import app_state
from sie_router.api.tei_bodies import (
    EmbedRequest,
    PredictRequest,
    SimilarityRequest,
    TEIDecodeRequest,
    TEIRerankRequest,
    TEITokenizeRequest,
    VertexRequest,
    is_tei_rerank,
)
from sie_router.errors import Api
from sie_router.pipeline import codec
from sie_sdk.types import (
    AddModelRequest,
    DecodeRequest,
    EncodeRequest,
    ExtractRequest,
    ScoreRequest,
    TokenizeRequest,
)

ADMIN_PREFIX = "/admin/"  # every admin route lives under it, and every route under it is an admin route (checked)


async def shared_rerank(request: Request) -> Response:
    """`/rerank` speaks two dialects: TEI's body has `texts`, Infinity's `documents`; each is answered in its shape."""
    body = await codec.read_body(request, app_state(request).settings.max_request_bytes)
    if is_tei_rerank(body):
        return await tei.answer(request, "rerank")
    return await rerank.infinity_rerank(request)


_TOKENS = ("`/v1/tokenize/{model}`: the model's own tokens and counts for texts (TokenizeRequest); "
           "`/v1/decode/{model}`: token ids back to text (DecodeRequest)")
_TEI_POST = ("TEI at the root, by the default model of each type: `/embed` (EmbedRequest), `/embed_sparse`, "
             "`/embed_all` (424), `/predict` (PredictRequest), `/similarity` (SimilarityRequest), `/tokenize` "
             "(TEITokenizeRequest), `/decode` (TEIDecodeRequest), `/vertex` (VertexRequest), `/` and `/invocations` "
             "(the default model's route); and each under `/tei/{model}/`, answered by that model")
_TEI_GET = ("TEI: `/info` (the default model's), `/` and `/ping` (health, empty body); and `/tei/{model}/info`, "
            "`/health`, `/ping`")
_CLASSIFY = Doc("Infinity-compatible classification", "infinity", classify.ClassifyRequest)

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("/v1/encode/{model:path}", "POST", native.encode, name="encode", model=ModelAt.PATH,
             doc=Doc("Encode items: dense, sparse or multivector", "native", EncodeRequest, msgpack=True)),
    Endpoint("/v1/score/{model:path}", "POST", native.score, name="score", model=ModelAt.PATH,
             doc=Doc("Score items against a query (rerank)", "native", ScoreRequest, msgpack=True)),
    Endpoint("/v1/extract/{model:path}", "POST", native.extract, name="extract", model=ModelAt.PATH,
             doc=Doc("Extract entities, labels or structure from items", "native", ExtractRequest, msgpack=True)),
    Endpoint("/v1/{op:tokens}/{model:path}", "POST", native.tokens, name="tokens", model=ModelAt.PATH,
             doc=Doc(_TOKENS, "native", mentions=(TokenizeRequest, DecodeRequest))),
    Endpoint("/v1/models", "GET", native.list_models, keeps_path=True,  # its union shape serves SIE clients too
             doc=Doc("List models (SIE `models` and OpenAI `data`)", "native")),
    Endpoint("/v1/models/{model:path}", "GET", native.get_model, model=ModelAt.PATH,
             doc=Doc("Describe one model", "native")),
    Endpoint("/v1/embeddings", "POST", embeddings.openai_embeddings, name="openai_embeddings", api=Api.OPENAI,
             model=ModelAt.BODY, doc=Doc("OpenAI-compatible embeddings", "openai", embeddings.EmbeddingsRequest)),
    Endpoint("/v1/rerank", "POST", rerank.openai_rerank, api=Api.OPENAI, model=ModelAt.BODY,
             doc=Doc("Cohere/Jina-style rerank", "openai", rerank.RerankRequest)),
    Endpoint("/embeddings", "POST", embeddings.infinity_embeddings, name="infinity_embeddings", api=Api.INFINITY,
             model=ModelAt.BODY, prefixed=True,
             doc=Doc("Infinity-compatible embeddings", "infinity", embeddings.EmbeddingsRequest)),
    Endpoint("/rerank", "POST", shared_rerank, api=Api.INFINITY, model=ModelAt.BODY, prefixed=True,
             doc=Doc("Rerank: Infinity's body (`documents`) or TEI's (`texts`, TEIRerankRequest), each answered in "
                     "its shape", "infinity", rerank.RerankRequest, mentions=(TEIRerankRequest,))),
    Endpoint("/classify", "POST", classify.classify, api=Api.INFINITY, model=ModelAt.BODY, prefixed=True,
             doc=_CLASSIFY),
    Endpoint("/v1/classify", "POST", classify.classify, api=Api.INFINITY, model=ModelAt.BODY, doc=_CLASSIFY),
    Endpoint("/models", "GET", infinity.models, api=Api.INFINITY, prefixed=True,
             doc=Doc("Infinity-compatible model list", "infinity")),
    Endpoint("/health", "GET", infinity.health, api=Api.INFINITY, access=Access.OPEN,
             doc=Doc("Infinity health: `{\"unix\": <time>}`", "health")),
    Endpoint("/healthz", "GET", health.healthz, access=Access.OPEN,
             doc=Doc("Liveness: `ok` while the process runs", "health", answer="text/plain")),
    Endpoint("/metrics", "GET", health.serve_metrics, access=Access.OPEN,
             doc=Doc("Prometheus metrics: Infinity's HTTP metric names and the `sie_*` metrics", "health",
                     answer="text/plain")),
    Endpoint("/admin/workers", "GET", admin.list_workers, access=Access.ADMIN,
             doc=Doc("Workers, their memory and queues, and the device ledger", "admin")),
    Endpoint("/admin/workers/{model:path}/evict", "POST", admin.evict, access=Access.ADMIN,
             doc=Doc("Evict a model's worker", "admin")),
    Endpoint("/admin/models", "GET", admin.list_models, name="admin_models", access=Access.ADMIN,
             doc=Doc("Registered models and where each came from: the bundle, `-m`, or runtime", "admin")),
    Endpoint("/admin/models", "POST", admin.add_model, name="admin_add_model", access=Access.ADMIN,
             doc=Doc("Register a model at runtime (a bundle id, a hub id or a folder); `load` loads it at once",
                     "admin", AddModelRequest)),
    Endpoint("/admin/models/{model:path}", "DELETE", admin.remove_model, name="admin_remove_model",
             access=Access.ADMIN, doc=Doc("Drain, evict and unregister a model; then it is 404 MODEL_NOT_FOUND",
                                          "admin")),
    Endpoint("/readyz", "GET", health.readyz, access=Access.OPEN,
             doc=Doc("Readiness: `ok` once the startup models are loaded, else 503", "health", answer="text/plain")),
    Endpoint("/openapi.json", "GET", openapi.openapi_json, access=Access.OPEN, doc=Doc("This document", "meta")),
    # TEI is two routes, one per method, over its route names (`api.tei`): the table and the OpenAPI document stay
    # short, and the handler is the same for every name anyway.
    Endpoint("/{route:tei_post}", "POST", tei.route, name="tei", api=Api.TEI, model=ModelAt.TEI,
             probe=tei.is_probe, doc=Doc(_TEI_POST, "tei", mentions=(EmbedRequest, PredictRequest, SimilarityRequest,
                                                                     TEITokenizeRequest, TEIDecodeRequest,
                                                                     VertexRequest))),
    Endpoint("/{route:tei_get}", "GET", tei.route, name="tei_get", api=Api.TEI, model=ModelAt.TEI,
             probe=tei.is_probe, doc=Doc(_TEI_GET, "tei")),
    Endpoint("/docs", "GET", openapi.docs, access=Access.OPEN,
             doc=Doc("Interactive API documentation", "meta", answer="text/html")),
    Endpoint("/docs/{asset}", "GET", openapi.docs_asset, name="docs_asset", access=Access.OPEN,
             probe=lambda method, path: path.removeprefix("/docs/") in openapi.DOCS_ASSETS,  # open, as /docs
             doc=Doc("Swagger UI's files, served by this server so that `/docs` needs no network", "meta",
                     answer="application/octet-stream")),
)
ROUTES = [endpoint.route() for endpoint in ENDPOINTS]

OPEN_PATHS = frozenset(e.path for e in ENDPOINTS if e.access is Access.OPEN)
_PROBED = tuple(e.probe for e in ENDPOINTS if e.probe is not None)
_OPENAI_PATHS = tuple(e.path for e in ENDPOINTS if e.api is Api.OPENAI)
_INFINITY_PATHS = frozenset(e.path for e in ENDPOINTS if e.api is Api.INFINITY)
_KEPT = frozenset(e.path for e in ENDPOINTS if e.keeps_path)


def api_of(path: str) -> Api:
    """Which envelope errors on this path are rendered in, for any path, routed or not (a 404 too); `/rerank` in
    TEI's dialect is marked by its handler."""
    if path.startswith(_OPENAI_PATHS):
        return Api.OPENAI
    if path.rstrip("/") in _INFINITY_PATHS:
        return Api.INFINITY
    if tei.is_tei_path(path):
        return Api.TEI
    return Api.NATIVE


def access_of(method: str, path: str) -> Access:
    """Who may call this path: probes, metrics and docs are open, as in Infinity and TEI; the admin API needs the
    admin token, whatever the path under it; the rest needs the API key (when one is set)."""
    if path in OPEN_PATHS or any(probe(method, path) for probe in _PROBED):
        return Access.OPEN
    if path.startswith(ADMIN_PREFIX) or path == ADMIN_PREFIX.rstrip("/"):
        return Access.ADMIN
    return Access.KEY


def prefixed_paths(prefix: str) -> dict[str, str]:
    """Infinity's `--url-prefix`: each prefixed path -> the route it stands for, unless a route keeps that path."""
    return {prefix + e.path: e.path for e in ENDPOINTS if e.prefixed and prefix + e.path not in _KEPT}


def _check_table() -> None:
    for endpoint in ENDPOINTS:
        admin_path = endpoint.path.startswith(ADMIN_PREFIX)
        if admin_path != (endpoint.access is Access.ADMIN):
            raise TypeError(f"{endpoint.path}: admin routes, and only they, live under {ADMIN_PREFIX}")
        if endpoint.model is ModelAt.PATH and "{model:path}" not in endpoint.path:
            raise TypeError(f"{endpoint.path}: a route that names its model in the path has a {{model:path}}")
    keys = [(e.method, e.path) for e in ENDPOINTS]
    if len(set(keys)) != len(keys):
        raise TypeError("a method and path appear twice in the route table")


_check_table()
