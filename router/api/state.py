"""What every route handler needs, in one object stored on the app (router process)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request

from sie_router.models.registry import Registry
from sie_router.pipeline.catalog import Catalog
from sie_router.pipeline.service import Service
from sie_router.pool.pool import WorkerPool
from sie_router.settings import Settings


@dataclass
class AppState:
    settings: Settings
    registry: Registry
    pool: WorkerPool
    service: Service
    catalog: Catalog
    ready: bool = False
    startup_failure: str | None = None  # why an -m model could not load; the server is stopping
    stop_server: Callable[[], None] | None = None  # set by `main`: ends uvicorn's loop, so main can exit non-zero


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.sie
    return state
