"""Logs and traces, for both processes: the router imports this module as it imports `protocol`.

At import it needs only the standard library and msgspec. OpenTelemetry is imported by `start_tracing` alone, so a
server with tracing off (the default) never loads it, in the router or in any worker.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
LogContext = Callable[[], Mapping[str, Any]]
# uvicorn's access lines are logged as '%s - "%s %s HTTP/%s" %d' with these arguments.
_ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")
_encoder = msgspec.json.Encoder(enc_hook=str)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, then what `context` knows (the model, request id and
    trace id, where there is one) and the exception; uvicorn's access lines also carry their request's fields."""

    def __init__(self, context: LogContext | None = None) -> None:
        super().__init__()
        self.context = context

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            entry.update(zip(_ACCESS_FIELDS, record.args, strict=True))
        if self.context is not None:
            entry.update((key, value) for key, value in self.context().items() if value is not None)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _encoder.encode(entry).decode()


def configure_logging(level: str, as_json: bool, context: LogContext | None = None,
                      text_format: str = TEXT_FORMAT) -> None:
    """Every logger of the process (uvicorn's included, which propagate to the root) writes to stderr in one format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(context) if as_json else logging.Formatter(text_format))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a W3C `traceparent` (`00-<trace id>-<parent id>-<flags>`), or None if it is not one."""
    if not traceparent or len(traceparent) < 55 or traceparent[2] != "-" or traceparent[35] != "-":
        return None
    trace_id = traceparent[3:35].lower()
    if trace_id == "0" * 32 or any(c not in "0123456789abcdef" for c in trace_id):
        return None
    return trace_id


def start_tracing(endpoint: str, service_name: str, attributes: Mapping[str, Any]) -> Any:
    """A `TracerProvider` exporting in batches to an OTLP/HTTP (protobuf) endpoint, for this process only (no global
    provider is set). The resource names the service and this process; never its command line, which may hold keys."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": service_name, "process.pid": os.getpid(), **attributes})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


class PhaseSpans:
    """Spans for phases already timed, each under the span a W3C `traceparent` names: the worker's tokenisation,
    forward pass and post-processing of a batch, as children of the router's batch span."""

    def __init__(self, provider: Any, name: str) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer = provider.get_tracer(name)
        self.propagator = TraceContextTextMapPropagator()

    def record(self, name: str, traceparent: str, start_ns: int, end_ns: int, attributes: Mapping[str, Any]) -> None:
        parent = self.propagator.extract({"traceparent": traceparent})
        self.tracer.start_span(name, context=parent, start_time=start_ns, attributes=attributes).end(end_time=end_ns)

    def close(self) -> None:
        """Export what is still buffered (on exit)."""
        self.provider.shutdown()
