"""Models added and removed at runtime (router process): what `POST`, `DELETE` and `GET /admin/models` do.

Adding finds the model as `-m` does, gives the pool a slot, then registers it (so every served name has a slot); it
loads on first use, or at once when asked. Removing unregisters first, so new requests get 404 `MODEL_NOT_FOUND` at
once, lets the requests already admitted finish (up to the shutdown deadline), then evicts and forgets the model.
Changes are serialised, and kept in the model store when the server has one (`--model-store`).

A registration is this server's own: it never changes the pool map, so another pool never forwards to it; and a model
the pool map places in another pool is refused here, so that the cluster keeps one place for each model.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sie_router.errors import SIEError
from sie_router.models.registry import Origin, Registry, runtime_config, served_names
from sie_router.models.store import ModelStore
from sie_router.models.weights import WeightsNotFound
from sie_router.pipeline.service import Service
from sie_router.pool.pool import WorkerPool
from sie_router.settings import Settings
from sie_sdk.codes import ErrorCode
from sie_sdk.types import AddModelRequest

log = logging.getLogger("sie.catalog")


class Catalog:
    def __init__(self, settings: Settings, registry: Registry, pool: WorkerPool, service: Service,
                 store: ModelStore, pool_map: dict[str, str]) -> None:
        self.settings = settings
        self.registry = registry
        self.pool = pool
        self.service = service
        self.store = store
        self.pool_map = pool_map
        self._changes = asyncio.Lock()

    def rows(self) -> list[dict[str, Any]]:
        """Every registration: its names, where it came from, its family and load state."""
        return [{"model": key, "served_as": served_names(cfg), "source": str(self.registry.origins[key]),
                 "family": cfg.family(), "state": str(self.pool.slots[key].state), "config": cfg.source,
                 "stored": key in self.store.models} for key, cfg in self.registry.configs.items()]

    async def add(self, request: AddModelRequest) -> dict[str, Any]:
        async with self._changes:
            self._check_free(request.name)
            try:  # the files are read, or downloaded, off the event loop
                config = await asyncio.to_thread(runtime_config, self.registry, request,
                                                 offline=self.settings.hf_offline)
            except WeightsNotFound as exc:
                code = ErrorCode.MODEL_LOAD_FAILED if exc.transient or exc.unreachable else ErrorCode.MODEL_NOT_FOUND
                raise SIEError(code, str(exc), param="model") from None
            except ValueError as exc:
                raise SIEError(ErrorCode.INVALID_INPUT, str(exc)) from None
            for name in served_names(config):
                self._check_free(name)
            self.pool.add(config)
            self.registry.add(config, Origin.RUNTIME)
            self.store.put(request)
            log.info("model %s added at runtime (%s adapter, %s)", config.sie_id, config.family(), config.source)
        if request.load:
            await self.pool.ensure(config.sie_id, wait_s=self.settings.load_timeout_s)
        return {"model": config.sie_id, "served_as": served_names(config), "family": config.family(),
                "state": str(self.pool.slots[config.sie_id].state), "stored": self.store.path is not None}

    def _check_free(self, name: str) -> None:
        if name in self.registry.served:
            raise SIEError(ErrorCode.MODEL_EXISTS, f"'{name}' is already served (from the "
                           f"{self.registry.origins[self.registry.served[name][0].sie_id]}); remove it first",
                           param="model")
        if name in self.pool_map:
            raise SIEError(ErrorCode.MODEL_EXISTS, f"the pool map places '{name}' in the pool at "
                           f"{self.pool_map[name]}; add it there, or change the chart's pools", param="model")

    async def remove(self, name: str) -> dict[str, Any]:
        async with self._changes:
            if name not in self.registry.served and name in self.store.models:
                self.store.remove(name)  # stored, but it could not be registered at start: forget it
                return {"model": name, "removed": True, "drained": True}
            config, _ = self.registry.lookup(name)
            key = config.sie_id
            origin = self.registry.origins[key]
            self.registry.remove(key)  # from now on, new requests get 404
            drained = await self.pool.drain(key, self.settings.shutdown_deadline_s)
            await self.pool.drop_queue(key)
            await self.pool.remove(key)
            stored = next((n for n, r in self.store.models.items() if n in (name, key) or r.model == key), None)
            if stored is not None:
                self.store.remove(stored)
            log.info("model %s (from the %s) removed at runtime%s", key, origin,
                     "" if drained else "; requests still queued at the deadline failed")
        return {"model": key, "removed": True, "drained": drained, "source": str(origin)}
