"""What every route handler needs, in one object stored on the app (router process)."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from sie_router.pool import WorkerPool
from sie_router.registry import Registry
from sie_router.service import Service
from sie_router.settings import Settings


@dataclass
class AppState:
    settings: Settings
    registry: Registry
    pool: WorkerPool
    service: Service
    ready: bool = False


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.sie
    return state
