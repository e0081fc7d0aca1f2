"""`ModelInfo` for `/v1/models` (router process): config facts plus the pool's live state."""

from __future__ import annotations

from typing import Any

from sie_router.api.state import AppState
from sie_router.models.config import ModelConfig


def served_outputs(config: ModelConfig, profile: str) -> list[str]:
    """What a served name offers: a profile that fixes `output_types` (`BAAI/bge-m3:sparse`) narrows its model's."""
    chosen = config.profiles[profile].adapter_options.runtime.get("output_types")
    return [o for o in config.outputs if o in chosen] if chosen else config.outputs


def served_dims(state: AppState, config: ModelConfig, profile: str = "default") -> dict[str, int]:
    """Output widths as the loaded worker reports them (the config's until then), for the profile's outputs."""
    dims = dict(config.dims)
    worker = state.pool.slots[config.sie_id].worker
    if worker is not None and worker.info is not None:
        dims.update(worker.info.dims)
    outputs = served_outputs(config, profile)
    return {kind: dim for kind, dim in dims.items() if kind in outputs}


def model_info(state: AppState, name: str) -> dict[str, Any]:
    config, profile = state.registry.lookup(name)
    slot = state.pool.slots[config.sie_id]
    worker = slot.worker
    info = worker.info if worker else None
    return {
        "name": name,
        "family": config.family(profile),  # the adapter family, from the bundle or inferred from the files
        "inputs": config.input_kinds,
        "outputs": served_outputs(config, profile),
        "dims": served_dims(state, config, profile),
        "loaded": slot.state == "loaded",
        "state": slot.state,
        "last_error": slot.last_error,
        "max_sequence_length": config.max_sequence_length or (info.max_sequence_length if info else None),
        "profiles": {p: {"is_default": p == "default"} for p in config.profiles},
        "device": worker.device if worker else None,
        "engine": info.engine if info else None,  # what the loaded worker runs: torch, onnx or openvino
        "precision": info.precision if info else None,  # what it computes in: float32, bfloat16 or float16
        "memory_bytes": info.memory_bytes if info else None,
        "id": name,
        "object": "model",
        "owned_by": "sie",
    }
