"""`ModelInfo` for `/v1/models` (router process): config facts plus the pool's live state."""

from __future__ import annotations

from typing import Any

from sie_router.state import AppState


def model_info(state: AppState, name: str) -> dict[str, Any]:
    config, profile = state.registry.lookup(name)
    slot = state.pool.slots[config.sie_id]
    worker = slot.worker
    dims = dict(config.dims)
    if worker is not None and worker.info is not None:
        dims.update(worker.info.dims)
    return {
        "name": name,
        "inputs": config.input_kinds,
        "outputs": config.outputs,
        "dims": dims,
        "loaded": slot.state == "loaded",
        "state": slot.state,
        "last_error": slot.last_error,
        "max_sequence_length": config.max_sequence_length,
        "profiles": {p: {"is_default": p == "default"} for p in config.profiles},
        "device": worker.device if worker else None,
        "memory_bytes": worker.info.memory_bytes if worker and worker.info else None,
        "id": name,
        "object": "model",
        "owned_by": "sie",
    }
