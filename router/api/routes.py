"""The route list (router process): every path the server answers, its handler, and the API whose envelope its
errors are rendered in. Auth, forwarding, the URL prefix, metrics and the OpenAPI document read it."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sie_router.api import admin, classify, embeddings, health, infinity, native, openapi, rerank, tei
from sie_router.api.state import app_state
from sie_router.api.tei_bodies import is_tei_rerank
from sie_router.errors import Api
from sie_router.pipeline import codec

# Probes, metrics and the API description stay reachable without a key, as in Infinity and TEI.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/health", "/metrics", "/openapi.json", "/docs", "/ping"})
# TEI's probes under a per-model prefix (`/tei/{model}/health`), open like its root ones.
OPEN_SUFFIXES = ("/health", "/ping")
ADMIN_PREFIX = "/admin/"

_OPENAI_PATHS = ("/v1/embeddings", "/v1/rerank")
_INFINITY_PATHS = ("/embeddings", "/rerank", "/classify", "/v1/classify", "/models", "/health")
_TEI_PATHS = ("/", "/embed", "/embed_sparse", "/embed_all", "/predict", "/similarity", "/tokenize", "/decode", "/info",
              "/invocations", "/vertex", "/ping")


def api_of(path: str) -> Api:
    """Which envelope errors on this path are rendered in (`/rerank` in TEI's dialect is marked by its handler)."""
    if path.startswith(_OPENAI_PATHS):
        return Api.OPENAI
    if path.rstrip("/") in _INFINITY_PATHS:
        return Api.INFINITY
    if path in _TEI_PATHS or path.rstrip("/") in _TEI_PATHS or path.startswith("/tei/"):
        return Api.TEI
    return Api.NATIVE


async def shared_rerank(request: Request) -> Response:
    """`/rerank` speaks two dialects: TEI's body has `texts`, Infinity's `documents`; each is answered in its shape."""
    body = await codec.read_body(request, app_state(request).settings.max_request_bytes)
    if is_tei_rerank(body):
        return await tei.answer(request, "rerank")
    return await rerank.infinity_rerank(request)


ROUTES = [
    Route("/v1/encode/{model:path}", native.encode, methods=["POST"], name="encode"),
    Route("/v1/score/{model:path}", native.score, methods=["POST"], name="score"),
    Route("/v1/extract/{model:path}", native.extract, methods=["POST"], name="extract"),
    Route("/v1/{op:tokens}/{model:path}", native.tokens, methods=["POST"], name="tokens"),
    Route("/v1/models", native.list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", native.get_model, methods=["GET"]),
    Route("/v1/embeddings", embeddings.openai_embeddings, methods=["POST"], name="openai_embeddings"),
    Route("/v1/rerank", rerank.openai_rerank, methods=["POST"]),
    Route("/embeddings", embeddings.infinity_embeddings, methods=["POST"], name="infinity_embeddings"),
    Route("/rerank", shared_rerank, methods=["POST"]),
    Route("/classify", classify.classify, methods=["POST"]),
    Route("/v1/classify", classify.classify, methods=["POST"]),
    Route("/models", infinity.models, methods=["GET"]),
    Route("/health", infinity.health, methods=["GET"]),
    Route("/healthz", health.healthz, methods=["GET"]),
    Route("/metrics", health.serve_metrics, methods=["GET"]),
    Route("/admin/workers", admin.list_workers, methods=["GET"]),
    Route("/admin/workers/{model:path}/evict", admin.evict, methods=["POST"]),
    Route("/readyz", health.readyz, methods=["GET"]),
    Route("/openapi.json", openapi.openapi_json, methods=["GET"]),
    Route("/{route:tei_post}", tei.route, methods=["POST"], name="tei"),
    Route("/{route:tei_get}", tei.route, methods=["GET"], name="tei_get"),
    Route("/docs", openapi.docs, methods=["GET"]),
]
