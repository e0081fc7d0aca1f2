"""Request metrics (router process): an ASGI middleware that counts and times every request.

Handlers never touch metrics: the model a request is for is noted in a context variable when its name is resolved
(`request_labels.note_model`), and the middleware reads it once the response has started.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sie_router import metrics, request_labels


class Instrument:
    def __init__(self, app: ASGIApp, routes: list[Route]) -> None:
        self.app = app
        self.routes: dict[Any, Route] = {route.endpoint: route for route in routes}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        labels: dict[str, str] = {}
        token = request_labels.current.set(labels)

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            request_labels.current.reset(token)
            self._observe(scope, status, labels, time.perf_counter() - started)

    def _observe(self, scope: Scope, status: int, labels: dict[str, str], elapsed: float) -> None:
        route = self.routes.get(scope.get("endpoint"))
        handler = route.path if route else "none"
        metrics.HTTP_REQUESTS.labels(handler, scope["method"], metrics.status_class(status)).inc()
        metrics.HTTP_REQUEST_DURATION.labels(handler, scope["method"]).observe(elapsed)
        model = labels.get("model")
        if not model or route is None or not route.name:
            return
        if "forwarded" in labels:  # the pool that answers counts it in REQUESTS; counting it here too would double it
            metrics.FORWARDED.labels(model, route.name, str(status)).inc()
        else:
            metrics.REQUESTS.labels(model, route.name, str(status)).inc()
            metrics.REQUEST_DURATION.labels(model, route.name, "total").observe(elapsed)
