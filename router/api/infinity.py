"""Infinity-compatible root routes (router process): `/models`, `/health`, in Infinity's shapes.

`/embeddings`, `/rerank` and `/classify` live with their OpenAI twins in `embeddings`, `rerank` and `classify`."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response

from sie_router.api.model_info import served_outputs
from sie_router.api.state import app_state
from sie_router.pipeline import codec


def _capabilities(outputs: list[str], inputs: list[str], family: str) -> list[str]:
    found = []
    if "dense" in outputs and "text" in inputs:
        found.append("embed")
    if "dense" in outputs and "image" in inputs:
        found.append("image_embed")
    if "score" in outputs:
        found.append("rerank")
    if "json" in outputs and family == "classifier":  # NER and GLiNER extract, but `/classify` refuses them
        found.append("classify")
    return found


async def models(request: Request) -> Response:
    state = app_state(request)
    data = []
    for name, (config, profile) in state.registry.served.items():
        queued = state.pool.slots[config.sie_id].queued
        capacity = state.settings.max_queue_items
        capabilities = _capabilities(served_outputs(config, profile), config.input_kinds, config.family(profile))
        batch_size = state.pool.batch_limits(config.sie_id).max_items
        data.append({"id": name, "stats": {"queue_fraction": queued / capacity, "queue_absolute": queued,
                                           "results_pending": queued, "batch_size": batch_size},
                     "object": "model", "owned_by": "infinity", "created": int(state.pool.started_at),
                     "backend": "torch", "capabilities": capabilities})
    return codec.json_response({"data": data, "object": "list"})


async def health(request: Request) -> Response:
    state = app_state(request)
    return codec.json_response({"unix": time.time()}, status=200 if state.ready else 503)
