"""Liveness and readiness probes, and the `/metrics` scrape with its gauges (router process)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from sie_router import metrics
from sie_router.api.state import app_state


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def readyz(request: Request) -> Response:
    state = app_state(request)
    if state.ready and state.pool.accepting:
        return PlainTextResponse("ok")
    return PlainTextResponse("not ready", status_code=503)


def refresh_gauges(request: Request) -> None:
    """Gauges read at scrape time: device memory, models loaded, memory per model."""
    pool = app_state(request).pool
    pool.remeasure()
    for device in pool.devices.snapshot():
        metrics.DEVICE_MEMORY_USED.labels(device.name).set(device.used)
        metrics.DEVICE_MEMORY_TOTAL.labels(device.name).set(device.total)
    loaded: dict[str, int] = dict.fromkeys(pool.ledger.devices, 0)
    for key, slot in pool.slots.items():
        device = slot.worker.device if slot.worker else None
        if device is not None and slot.state == "loaded":
            loaded[device] = loaded.get(device, 0) + 1
            metrics.MODEL_MEMORY.labels(key, device).set(pool.ledger.reserved(key) or 0)
    for device, count in loaded.items():
        metrics.MODELS_LOADED.labels(device).set(count)


async def serve_metrics(request: Request) -> Response:
    refresh_gauges(request)
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


def declare_models(models: list[str]) -> None:
    """Create every per-model series at zero, so dashboards and the autoscaler see 0 rather than no data."""
    for model in models:
        metrics.QUEUE_DEPTH.labels(model).set(0)
        metrics.WORKER_RESTARTS.labels(model)
        metrics.WORKER_HANGS.labels(model)
        for result in metrics.LOAD_RESULTS:
            metrics.MODEL_LOADS.labels(model, result)
        for reason in metrics.EVICTION_REASONS:
            metrics.EVICTIONS.labels(model, reason)
