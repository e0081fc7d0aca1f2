"""Logs and traces of the router process: the log context of a request (its id, its trace id, its model), and the
OpenTelemetry spans of a request, of its wait in a model's queue and of the batch it joined.

Tracing is off unless an OTLP endpoint is set (`Settings.otlp_endpoint`); then `Tracing` exists and imports
OpenTelemetry. While it is off nothing here imports OpenTelemetry, and the hot path tests one attribute for None.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import Any

from sie_router import request_labels
from sie_router.settings import Settings
from sie_worker import telemetry

# Set once per request by `middleware.request_context` and never reset: each request runs in a task of its own, and a
# log line written after the response (an unhandled error's) still names its request.
request_id: ContextVar[str | None] = ContextVar("sie_request_id", default=None)
trace_id: ContextVar[str | None] = ContextVar("sie_trace_id", default=None)

# A request's place in its trace while it waits in a queue: its context and when it began waiting (ns).
Waiting = tuple[Any, int]


def log_context() -> dict[str, Any]:
    labels = request_labels.current.get()
    return {"model": labels.get("model") if labels else None, "request_id": request_id.get(),
            "trace_id": trace_id.get()}


def configure_logging(settings: Settings) -> None:
    level = settings.log_level.upper() if settings.log_level != "trace" else "DEBUG"
    telemetry.configure_logging(level, settings.log_format == "json", log_context)


class Tracing:
    """The router's spans: a server span per HTTP request, continuing the client's W3C `traceparent` (a new trace
    without one); a span per queue wait; a span per batch, the child of its first request's span and linked to the
    wait of every request in it, so that a batch serving several traces is found from each. The batch span's context
    travels to the worker inside the batch message (`traceparent`), and the worker's spans are its children."""

    def __init__(self, settings: Settings) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        assert settings.otlp_endpoint is not None
        self.provider = telemetry.start_tracing(settings.otlp_endpoint, settings.otlp_service_name,
                                                {"sie.process": "router"})
        self.tracer = self.provider.get_tracer("sie_router")
        self._context, self._trace = context, trace
        self._propagator = TraceContextTextMapPropagator()

    def request(self, method: str, path: str, headers: dict[str, str]) -> tuple[Any, object]:
        """Start a request's server span and make it current; (span, token for `end_request`)."""
        parent = self._propagator.extract(headers)
        span = self.tracer.start_span(method, context=parent, kind=self._trace.SpanKind.SERVER,
                                      attributes={"http.request.method": method, "url.path": path})
        trace_id.set(format(span.get_span_context().trace_id, "032x"))
        return span, self._context.attach(self._trace.set_span_in_context(span))

    def end_request(self, span: Any, token: object, route: str | None, status: int) -> None:
        labels = request_labels.current.get() or {}
        if route:
            span.update_name(f"{span.name} {route}")
            span.set_attribute("http.route", route)
        span.set_attribute("http.response.status_code", status)
        if labels.get("model"):
            span.set_attribute("sie.model", labels["model"])
        if labels.get("inputs"):
            span.set_attribute("sie.inputs", int(labels["inputs"]))
        span.set_attribute("sie.request_id", request_id.get() or "")
        if status >= 500:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR))
        span.end()
        self._context.detach(token)

    def waiting(self) -> Waiting:
        """The current request's context as it joins a queue."""
        return self._context.get_current(), time.time_ns()

    @contextlib.contextmanager
    def batch(self, model: str, waits: Sequence[Waiting | None], items: int) -> Iterator[None]:
        """A batch leaving the queue: each request's wait ends now; the batch span is current until the batch ends."""
        now = time.time_ns()
        links, parent = [], None
        for waited in waits:
            if waited is None:
                continue
            wait = self.tracer.start_span("sie.queue", context=waited[0], start_time=waited[1],
                                          attributes={"sie.model": model})
            wait.end(end_time=now)
            links.append(self._trace.Link(wait.get_span_context()))
            parent = waited[0] if parent is None else parent
        span = self.tracer.start_span("sie.batch", context=parent, links=links, start_time=now,
                                      attributes={"sie.model": model, "sie.batch.items": items,
                                                  "sie.batch.requests": len(links)})
        token = self._context.attach(self._trace.set_span_in_context(span))
        try:
            yield
        finally:
            self._context.detach(token)
            span.end()

    def traceparent(self) -> str | None:
        """The current span's W3C `traceparent`, for a batch message."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return carrier.get("traceparent")

    def close(self) -> None:
        """Export what is still buffered (at shutdown)."""
        self.provider.shutdown()
