"""Request ids and trace spans (router process): an ASGI middleware around every request.

A request's id is its `X-Request-Id` when the client sent a usable one, else a new one; it is echoed in the response
and names the request in every log line written while it runs (`sie_router.telemetry.log_context`). With tracing on,
the request gets its server span, continuing the client's `traceparent`; with tracing off, a `traceparent` the client
sent still gives the log lines their trace id.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sie_router import telemetry
from sie_worker.telemetry import trace_id_of

REQUEST_ID = b"x-request-id"
# What a client's id may be: short, printable, no spaces (it is echoed in a header and written into logs).
_USABLE_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {name: value for name, value in scope["headers"] if name in (REQUEST_ID, b"traceparent", b"tracestate")}


class RequestContext:
    def __init__(self, app: ASGIApp, routes: list[Route], tracing: telemetry.Tracing | None) -> None:
        self.app = app
        self.routes: dict[Any, Route] = {route.endpoint: route for route in routes}
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        given = headers.get(REQUEST_ID, b"")
        request_id = given.decode() if _USABLE_ID.fullmatch(given) else uuid.uuid4().hex
        telemetry.request_id.set(request_id)
        echoed = (REQUEST_ID, request_id.encode())
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", []), echoed]
            await send(message)

        if self.tracing is None:
            telemetry.trace_id.set(trace_id_of(headers.get(b"traceparent", b"").decode("latin-1")))
            await self.app(scope, receive, send_with_id)
            return
        carrier = {name.decode(): value.decode("latin-1") for name, value in headers.items()}
        span, token = self.tracing.request(scope["method"], scope["path"], carrier)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = self.routes.get(scope.get("endpoint"))
            self.tracing.end_request(span, token, route.path if route else None, status)
