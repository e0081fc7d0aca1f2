"""Admin API (router process): list workers, evict a model; list, add and remove models at runtime
(`pipeline.catalog`). Behind the admin token when one is configured."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from sie_router import metrics
from sie_router.api import health
from sie_router.api.state import app_state
from sie_router.errors import invalid
from sie_router.pipeline import codec
from sie_router.pipeline.resolve import resolve
from sie_router.pool.pool import WorkerPool
from sie_router.pool.slots import Slot
from sie_sdk.types import AddModelRequest


def worker_row(pool: WorkerPool, slot: Slot) -> dict[str, Any]:
    worker = slot.worker
    info = worker.info if worker else None
    used = pool.placement.last_used(slot.key) if worker else None
    backoff = pool.supervisor.restarts.of(slot.key)
    return {
        "model": slot.key,
        "state": slot.state,
        "pid": info.pid if info else (worker.process.pid if worker else None),
        "device": worker.device if worker else pool.ledger.placement.get(slot.key),
        "memory_bytes": (pool.devices.process_memory(info.pid, worker.device, info.memory_bytes, info.context_bytes)
                         if worker and info else None),
        "memory_budget_bytes": pool.ledger.reserved(slot.key),
        "queue_depth": slot.queued,
        "requests_served": worker.items_served if worker else 0,
        "last_used_s_ago": round(time.monotonic() - used, 3) if used is not None else None,
        "uptime_s": round(time.time() - worker.started_at, 3) if worker else None,
        "pinned": pool.evictor.pinned(slot.key),
        # Crashes and hangs of its ready workers, each followed by a restart; the back-off left before the next.
        "restarts": backoff.restarts,
        "backoff_s": round(backoff.left(), 3) or None,
        "last_error": slot.last_error,
    }


async def list_workers(request: Request) -> Response:
    pool = app_state(request).pool
    pool.remeasure()
    rows = [worker_row(pool, s) for s in pool.slots.values()
            if s.worker or s.state != "available" or pool.supervisor.restarts.of(s.key).restarts]
    readings = {d.name: d for d in pool.devices.snapshot()}
    devices = [{"device": name, "total_bytes": readings[name].total if name in readings else budget.budget,
                "used_bytes": readings[name].used if name in readings else 0, "budget_bytes": budget.budget,
                "reserved_bytes": budget.budget - budget.free} for name, budget in pool.ledger.devices.items()]
    return codec.json_response({"workers": rows, "devices": devices})


async def evict(request: Request) -> Response:
    state = app_state(request)
    name = request.path_params["model"]
    model = resolve(state.registry, name)
    evicted = await state.pool.evict(model.key, reason="admin")
    return codec.json_response({"model": model.key, "evicted": evicted})


async def list_models(request: Request) -> Response:
    """Every registration and where it came from: the bundle, `-m`, or runtime."""
    return codec.json_response({"models": app_state(request).catalog.rows()})


async def add_model(request: Request) -> Response:
    state = app_state(request)
    body = await codec.read_body(request, state.settings.max_request_bytes)
    try:
        added = msgspec.json.decode(body, type=AddModelRequest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise invalid(f"invalid body for POST /admin/models: {exc}") from None
    if not added.model.strip():
        raise invalid("`model` names the model to add: a bundle id, a hub id or a local folder", param="model")
    answer = await state.catalog.add(added)
    health.declare_models([answer["model"]])
    return codec.json_response(answer, status=201)


async def remove_model(request: Request) -> Response:
    state = app_state(request)
    answer = await state.catalog.remove(request.path_params["model"])
    with contextlib.suppress(KeyError):  # the autoscaler no longer sees a queue for it
        metrics.QUEUE_DEPTH.remove(answer["model"])
    return codec.json_response(answer)
