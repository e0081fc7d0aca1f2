"""Liveness and readiness probes (router process)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from sie_router.state import app_state


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def readyz(request: Request) -> Response:
    state = app_state(request)
    if state.ready and state.pool.accepting:
        return PlainTextResponse("ok")
    return PlainTextResponse("not ready", status_code=503)
