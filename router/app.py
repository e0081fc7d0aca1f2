"""build_app(): the routes (`api.routes`), the error handlers, the middleware, and the lifespan that starts and
stops the pool."""

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
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response

from sie_router import telemetry
from sie_router.api import health, openapi
from sie_router.api.disconnect import ClientGone
from sie_router.api.routes import ENDPOINTS, ROUTES, api_of
from sie_router.api.state import AppState
from sie_router.errors import Api, LoadError, SIEError, render_error
from sie_router.middleware.auth import Auth
from sie_router.middleware.forward import Forward, load_pool_map
from sie_router.middleware.instrument import Instrument
from sie_router.middleware.prefix import UrlPrefix
from sie_router.middleware.request_context import REQUEST_ID, RequestContext
from sie_router.middleware.version import VersionHeader
from sie_router.models.registry import Registry
from sie_router.models.store import ModelStore
from sie_router.pipeline.catalog import Catalog
from sie_router.pipeline.service import Service
from sie_router.pool.devices import detect
from sie_router.pool.loader import cooldown
from sie_router.pool.pool import WorkerPool
from sie_router.settings import Settings
from sie_router.telemetry import Tracing
from sie_sdk.codes import ErrorCode

log = logging.getLogger("sie.app")

def _api(request: Request) -> Api:
    marked: Api | None = request.scope.get("sie.api")
    return marked or api_of(request.url.path)


async def _sie_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SIEError)
    return render_error(exc, _api(request))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}.get(exc.status_code, ErrorCode.INVALID_INPUT)
    return render_error(SIEError(code, str(exc.detail)), _api(request))


async def _undecodable(request: Request, exc: Exception) -> Response:
    # msgspec raises these, not DecodeError, on a body nested past its depth limit or a string that is not UTF-8.
    problem = "is nested too deeply" if isinstance(exc, RecursionError) else "holds a string that is not UTF-8"
    return render_error(SIEError(ErrorCode.INVALID_INPUT, f"the request body {problem}"), _api(request))


async def _client_gone(request: Request, exc: Exception) -> Response:
    # Nobody reads this answer; 499 (nginx's "client closed request") keeps it apart from real errors in metrics.
    return Response(status_code=499)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    response = render_error(SIEError(ErrorCode.INTERNAL_ERROR, "internal server error"), _api(request))
    # Starlette answers an unhandled error from its outermost middleware, outside RequestContext, which therefore
    # never sees this response: the id the operator greps the log for is added here.
    request_id = telemetry.request_id.get()
    if request_id is not None:
        response.headers["X-Request-Id"] = request_id
    return response


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
                if exc.code == ErrorCode.MODEL_LOADING and name in required:
                    continue  # a long download, still going: the load's own steps bound it, not this wait
                if name not in required:
                    if exc.code == ErrorCode.RESOURCE_EXHAUSTED:
                        log.warning("%s does not fit in the memory budget beside the other models; it will load "
                                    "lazily on its first request (%s)", name, exc.message)
                    else:
                        log.error("preloading %s failed: %s", name, exc.message)
                    return
                if exc.extra.get("permanent", True) or attempt == STARTUP_LOAD_ATTEMPTS:
                    _stop_for(state, f"model {name!r} could not load: {exc.message}")
                    return
                # The pool answers the same failure until its cooldown ends; the next attempt comes just after it.
                wait_s = (cooldown(state.settings, exc) if isinstance(exc, LoadError)
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


# Response headers a browser page may read across origins: the request id, retry hints and our error code.
CORS_EXPOSED = [REQUEST_ID.decode(), "retry-after", "x-sie-error-code", "x-sie-server-version", "x-sie-engine-version"]


def cors(settings: Settings) -> dict[str, Any] | None:
    """CORSMiddleware's options, or None when CORS is closed (no origin given). Credentials are never allowed: the
    API takes bearer tokens, never cookies, and a credentialed `*` would hand any page the user's session."""
    if not (settings.permissive_cors or settings.cors_allow_origins):
        return None
    any_origin = settings.permissive_cors or "*" in settings.cors_allow_origins
    return {"allow_origins": ["*"] if any_origin else list(settings.cors_allow_origins),
            "allow_methods": ["GET", "POST", "DELETE"], "allow_headers": ["*"], "allow_credentials": False,
            "expose_headers": CORS_EXPOSED, "max_age": 600}


def build_app(settings: Settings, registry: Registry) -> Starlette:
    pool = WorkerPool(settings, registry, detect(settings.device, settings.cuda_visible_devices))
    tracing = Tracing(settings) if settings.otlp_endpoint else None
    service = Service(settings, pool, tracing)
    pool_map = load_pool_map(settings.pool_map) if settings.pool_map else {}
    catalog = Catalog(settings, registry, pool, service, ModelStore(settings.model_store), pool_map)
    state = AppState(settings=settings, registry=registry, pool=pool, service=service, catalog=catalog)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await pool.start()
        health.declare_models(list(registry.configs))
        names = list(dict.fromkeys([*registry.named, *settings.preload, *registry.load_at_start]))
        preload = asyncio.create_task(_preload(state, names), name="sie-preload")
        try:
            yield
        finally:
            state.ready = False
            preload.cancel()
            loads = [slot.loading for slot in pool.slots.values() if slot.loading is not None]
            await pool.shutdown()
            await _settle(loads)
            if tracing is not None:
                await asyncio.to_thread(tracing.close)

    app = Starlette(routes=ROUTES, lifespan=lifespan,
                    exception_handlers={SIEError: _sie_error, HTTPException: _http_error, ClientGone: _client_gone,
                                        RecursionError: _undecodable, UnicodeDecodeError: _undecodable,
                                        Exception: _unexpected})
    # No slash redirects: a client follows a 307 without its body (POST /v1/encode/ -> GET). A path that does not
    # exist is a JSON 404 (a wrong method a 405) in its API's envelope, through `_http_error`.
    app.router.redirect_slashes = False
    app.state.sie = state
    app.state.openapi = openapi.encoded(ENDPOINTS, api_key=bool(settings.api_key),
                                        admin_token=bool(settings.admin_token))
    # Innermost: a request for another pool's model is forwarded only once Auth has let it in.
    app.add_middleware(Forward, settings=settings, registry=registry, pool_map=pool_map)
    app.add_middleware(Auth, settings=settings)
    app.add_middleware(VersionHeader)  # added after Auth, so outside it: auth refusals carry the version headers too
    # Inside Instrument, whose per-request labels (the model, the input count) the request's span reads at its end.
    app.add_middleware(RequestContext, routes=ROUTES, tracing=tracing)
    app.add_middleware(Instrument, routes=ROUTES)  # counts and times every answer
    if settings.url_prefix:  # the rest sees the Infinity route the prefixed path stands for
        app.add_middleware(UrlPrefix, prefix=settings.url_prefix)
    options = cors(settings)
    if options is not None:  # outermost: preflights are answered before auth, which they never carry
        app.add_middleware(CORSMiddleware, **options)
    return app
