"""build_app(): the only route list, the error handlers, and the lifespan that starts and stops the pool."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sie_router import WIRE_VERSION, __version__, codec, forward, instrument, openapi
from sie_router.api import admin, classify, embeddings, health, infinity, native, rerank, tei
from sie_router.auth import Auth
from sie_router.devices import detect
from sie_router.disconnect import ClientGone
from sie_router.errors import Api, LoadError, SIEError, render_error
from sie_router.pool import WorkerPool
from sie_router.prefix import UrlPrefix
from sie_router.registry import Registry
from sie_router.service import Service
from sie_router.settings import Settings
from sie_router.state import AppState, app_state
from sie_router.tei_bodies import is_tei_rerank

log = logging.getLogger("sie.app")

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


def _api(request: Request) -> Api:
    marked: Api | None = request.scope.get("sie.api")
    return marked or api_of(request.url.path)


async def _sie_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SIEError)
    return render_error(exc, _api(request))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "INVALID_INPUT")
    return render_error(SIEError(code, str(exc.detail)), _api(request))


async def _undecodable(request: Request, exc: Exception) -> Response:
    # msgspec raises these, not DecodeError, on a body nested past its depth limit or a string that is not UTF-8.
    problem = "is nested too deeply" if isinstance(exc, RecursionError) else "holds a string that is not UTF-8"
    return render_error(SIEError("INVALID_INPUT", f"the request body {problem}"), _api(request))


async def _client_gone(request: Request, exc: Exception) -> Response:
    # Nobody reads this answer; 499 (nginx's "client closed request") keeps it apart from real errors in metrics.
    return Response(status_code=499)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return render_error(SIEError("INTERNAL_ERROR", "internal server error"), _api(request))


class VersionHeader:
    """Adds `X-SIE-Server-Version` (the wire version, so sie-sdk sees no skew) and our engine version to every reply."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.headers = [(b"x-sie-server-version", WIRE_VERSION.encode()),
                        (b"x-sie-engine-version", __version__.encode())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)


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
    Route("/metrics", instrument.serve_metrics, methods=["GET"]),
    Route("/admin/workers", admin.list_workers, methods=["GET"]),
    Route("/admin/workers/{model:path}/evict", admin.evict, methods=["POST"]),
    Route("/readyz", health.readyz, methods=["GET"]),
    Route("/openapi.json", openapi.openapi_json, methods=["GET"]),
    Route("/{route:tei_post}", tei.route, methods=["POST"], name="tei"),
    Route("/{route:tei_get}", tei.route, methods=["GET"], name="tei_get"),
    Route("/docs", openapi.docs, methods=["GET"]),
]


STARTUP_LOAD_ATTEMPTS = 2  # an -m model's transient load failures (worker crash, timeout, hub down) are retried


async def _preload(state: AppState, names: list[str]) -> None:
    """Load the models named at startup, in parallel; readiness waits for them, as Infinity's late-opening port does.

    A `--preload` model that does not fit beside the ones already reserved is left to load lazily: preloading never
    evicts. An `-m` model must load: a permanent failure, or a transient one that outlasts its retries, stops the
    server (`sie-server serve` then exits non-zero with the reason), and readiness never comes before it loads.
    """
    required = set(state.registry.named)

    async def load(name: str) -> None:
        attempt = 1
        while True:
            try:
                await state.pool.ensure(name, wait_s=state.settings.load_timeout_s, evict=False)
                return
            except SIEError as exc:
                if exc.code == "MODEL_LOADING" and name in required:
                    continue  # a long download, still going: the load's own steps bound it, not this wait
                if name not in required:
                    if exc.code == "RESOURCE_EXHAUSTED":
                        log.warning("%s does not fit in the memory budget beside the other models; it will load "
                                    "lazily on its first request (%s)", name, exc.message)
                    else:
                        log.error("preloading %s failed: %s", name, exc.message)
                    return
                if exc.extra.get("permanent", True) or attempt == STARTUP_LOAD_ATTEMPTS:
                    _stop_for(state, f"model {name!r} could not load: {exc.message}")
                    return
                # The pool answers the same failure until its cooldown ends; the next attempt comes just after it.
                wait_s = (state.pool.cooldown(exc) if isinstance(exc, LoadError)
                          else state.settings.load_retry_cooldown_s)
                log.warning("loading %s failed (attempt %d of %d, retrying in %gs): %s", name, attempt,
                            STARTUP_LOAD_ATTEMPTS, wait_s, exc.message)
                await asyncio.sleep(wait_s)
                attempt += 1

    await asyncio.gather(*(load(name) for name in names))
    if state.startup_failure is None:
        state.ready = True
        log.info("ready: serving %d model(s)", len(state.registry.served))


async def _settle(loads: list[asyncio.Task[Any]]) -> None:
    """Collect the loads that shutdown cut short, so their expected failure is not logged as a stray traceback."""
    if loads:
        await asyncio.wait(loads, timeout=5.0)
    for task in loads:
        if task.done() and not task.cancelled():
            task.exception()


def _stop_for(state: AppState, reason: str) -> None:
    """Shut the server down; `main` then exits non-zero with `reason`."""
    if state.startup_failure is None:
        state.startup_failure = reason
        if state.stop_server is not None:
            state.stop_server()
        else:  # not run by `main` (an embedding host): stop as SIGTERM would
            os.kill(os.getpid(), signal.SIGTERM)


def build_app(settings: Settings, registry: Registry) -> Starlette:
    pool = WorkerPool(settings, registry, detect(settings.device, settings.cuda_visible_devices))
    state = AppState(settings=settings, registry=registry, pool=pool, service=Service(settings, pool))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await pool.start()
        instrument.declare_models(list(registry.configs))
        names = list(dict.fromkeys([*registry.named, *settings.preload]))
        preload = asyncio.create_task(_preload(state, names), name="sie-preload")
        try:
            yield
        finally:
            state.ready = False
            preload.cancel()
            loads = [slot.loading for slot in pool.slots.values() if slot.loading is not None]
            await state.service.close()
            await pool.shutdown()
            await _settle(loads)

    app = Starlette(routes=ROUTES, lifespan=lifespan,
                    exception_handlers={SIEError: _sie_error, HTTPException: _http_error, ClientGone: _client_gone,
                                        RecursionError: _undecodable, UnicodeDecodeError: _undecodable,
                                        Exception: _unexpected})
    # No slash redirects: a client follows a 307 without its body (POST /v1/encode/ -> GET). A path that does not
    # exist is a JSON 404 (a wrong method a 405) in its API's envelope, through `_http_error`.
    app.router.redirect_slashes = False
    app.state.sie = state
    app.state.openapi = openapi.encoded(ROUTES, api_key=bool(settings.api_key),
                                        admin_token=bool(settings.admin_token))
    # Innermost: a request for another pool's model is forwarded only once Auth has let it in.
    app.add_middleware(forward.Forward, settings=settings, registry=registry, routes=ROUTES, api_of=api_of)
    app.add_middleware(Auth, settings=settings, api_of=api_of)
    app.add_middleware(VersionHeader)  # added after Auth, so outside it: auth refusals carry the version headers too
    app.add_middleware(instrument.Instrument, routes=ROUTES)  # counts and times every answer
    if settings.url_prefix:  # outermost: the rest sees the Infinity route the prefixed path stands for
        app.add_middleware(UrlPrefix, prefix=settings.url_prefix)
    return app
