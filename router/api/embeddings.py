"""The embeddings route shared by `/v1/embeddings` (OpenAI) and `/embeddings` (Infinity) (router process).

The two flavours differ only in usage counting, `dimensions` renormalisation, model routing and error envelopes.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import msgspec
import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from sie_router import codec
from sie_router.disconnect import guarded
from sie_router.errors import Api, SIEError, invalid
from sie_router.inputs import input_items
from sie_router.models import served_outputs
from sie_router.postprocess import cut_dimensions
from sie_router.registry import ModelConfig
from sie_router.service import EncodePlan
from sie_router.state import AppState, app_state
from sie_router.token_ids import decode_token_ids
from sie_sdk.types import ImageInput, Item

MAX_INPUTS = 2048
INFINITY_MAX_CHARS = 122_880
# Infinity's modalities and the capability each needs (its 400 names the capability).
MODALITIES = {"text": "embed", "image": "image_embed", "audio": "audio_embed"}


class EmbeddingsRequest(msgspec.Struct, kw_only=True):
    """OpenAI's embeddings body plus Infinity's `modality` and our `is_query`/`instruction` extras."""

    input: Any = msgspec.UNSET
    model: str = "default/not-specified"
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None
    modality: str = "text"
    is_query: bool = False
    instruction: str | None = None


def parse_inputs(raw: Any, *, allow_token_ids: bool) -> list[str]:
    """`input` as a list of texts: a string, a list of strings, or token-id arrays decoded from cl100k_base."""
    if raw is msgspec.UNSET:
        raise invalid("`input` is required", param="input")
    if isinstance(raw, str):
        return [raw]
    if not isinstance(raw, list) or not raw:
        raise invalid("`input` must be a string, a non-empty list of strings, or token-id arrays", param="input")
    if len(raw) > MAX_INPUTS:
        raise invalid(f"`input` holds {len(raw)} entries; at most {MAX_INPUTS}", param="input")
    if all(isinstance(x, str) for x in raw):
        return list(raw)
    if allow_token_ids and all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
        return [decode_token_ids(raw)]
    if allow_token_ids and all(isinstance(x, list) and x and all(isinstance(i, int) for i in x) for x in raw):
        return [decode_token_ids(x) for x in raw]
    raise invalid("`input` must be a string, a list of strings, or token-id arrays", param="input")


def image_items(texts: list[str]) -> list[Item]:
    """Infinity's image input: `data:image/...;base64,` URIs (remote URLs are refused: an SSRF risk)."""
    items = []
    for i, uri in enumerate(texts):
        head, _, payload = uri.partition(",")
        if not (head.startswith("data:image/") and head.endswith(";base64")):
            raise SIEError("INVALID_MEDIA", f"input[{i}] must be a data:image/...;base64 URI; remote image URLs are "
                           "disabled on this server", param="input")
        try:
            data = base64.b64decode(payload, validate=True)
        except ValueError:
            raise SIEError("INVALID_MEDIA", f"input[{i}] is not valid base64", param="input") from None
        items.append(Item(images=[ImageInput(data=data, format=head[len("data:image/"):-len(";base64")])]))
    return items


def served_model(state: AppState, name: str, api: Api) -> str:
    """The served model a request names; Infinity ignores `model` when one model is served, as Infinity does."""
    model = _match_served(state, name, api)
    state.registry.lookup(model)  # labels the request's metrics with its model
    return model


def _match_served(state: AppState, name: str, api: Api) -> str:
    served = list(state.registry.served)
    if api is Api.INFINITY:
        if len(state.registry.configs) == 1:
            return next(iter(state.registry.configs))
        for candidate in served:
            if name == candidate or name == "/".join(candidate.rstrip("/").split("/")[-2:]):
                return candidate
        raise SIEError("INVALID_INPUT", f"Invalid model: Engine for model name `{name}` not found. Available model "
                       f"names are {served}", param="model")
    if name not in state.registry.served:
        raise SIEError("MODEL_NOT_FOUND", f"model '{name}' not found; served models: {served}", param="model")
    return name


def _dense_config(state: AppState, model: str, modality: str) -> ModelConfig:
    config, profile = state.registry.lookup(model)
    outputs = served_outputs(config, profile)
    if "dense" not in outputs:
        raise SIEError("MODEL_NOT_SUPPORTED", f"model '{model}' has no dense output (it offers {outputs}); "
                       "use /v1/encode for sparse or multivector outputs", param="model")
    if modality not in MODALITIES:
        raise invalid(f"modality must be one of {list(MODALITIES)}, not {modality!r}", param="modality")
    if modality not in config.input_kinds:  # Infinity's capability check: a 400 naming what the model lacks
        raise SIEError("MODEL_NOT_SUPPORTED", f"ModelNotDeployedError: model=`{model}` does not support "
                       f"`{MODALITIES[modality]}`; it takes {config.input_kinds}", param="model")
    return config


async def _encode(request: Request, model: str, items: list[Any], plan: EncodePlan, images: bool) -> list[Any]:
    state = app_state(request)
    try:
        return await guarded(request, state.service.encode(model, items, plan, wait_s=state.settings.load_wait_s))
    except SIEError as exc:
        if images and exc.code == "INVALID_INPUT":  # the worker could not use an image: Infinity's ImageCorrupt
            raise SIEError("INVALID_MEDIA", f"ImageCorrupt: {exc.message}") from None
        raise


def _check_dimensions(dimensions: int | None, native: int) -> int:
    if dimensions is None or dimensions == 0:
        return native
    if not 1 <= dimensions <= native:
        raise SIEError("INVALID_DIMENSIONS", f"dimensions must be between 1 and {native}, not {dimensions}",
                       param="dimensions")
    return dimensions


async def embed(request: Request, api: Api) -> Response:
    state = app_state(request)
    body = await codec.read_body(request, state.settings.max_request_bytes)
    req = codec.decode(body, EmbeddingsRequest, msgpack=False)
    model = served_model(state, req.model, api)
    if req.encoding_format not in ("float", "base64"):
        raise invalid(f"encoding_format must be 'float' or 'base64', not {req.encoding_format!r}",
                      param="encoding_format")
    texts = parse_inputs(req.input, allow_token_ids=True)
    if api is Api.INFINITY:
        texts = [t.strip() for t in texts]
    config = _dense_config(state, model, req.modality)
    raw_items = image_items(texts) if req.modality == "image" else [Item(text=t) for t in texts]
    items = input_items(raw_items, config, state.settings, field="input")
    plan = EncodePlan(output_types=["dense"], is_query=req.is_query, instruction=req.instruction,
                      runtime=config.profiles["default"].adapter_options.runtime)
    plan.worker_options = {k: v for k, v in plan.runtime.items() if k in ("pooling", "normalize")}
    native = config.dims.get("dense") or 0
    outputs = await _encode(request, model, items, plan, images=req.modality == "image")
    vectors = np.stack([o.dense for o in outputs if o.dense is not None])
    dims = _check_dimensions(req.dimensions, native or vectors.shape[1])
    if dims != vectors.shape[1]:
        normalized = bool(plan.runtime.get("normalize", True))
        vectors = cut_dimensions(vectors, dims, renormalize=api is Api.OPENAI and normalized)
    tokens = sum(o.tokens for o in outputs) if api is Api.OPENAI else sum(len(t) for t in texts)
    prefix = "emb" if api is Api.OPENAI else "infinity"
    return codec.json_response({
        "object": "list", "data": _data(vectors, req.encoding_format), "model": model if api is Api.INFINITY
        else req.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "id": f"{prefix}-{uuid.uuid4()}", "created": int(time.time())})


def _data(vectors: np.ndarray, encoding_format: str) -> list[dict[str, Any]]:
    vectors = vectors.astype("<f4", copy=False)
    if encoding_format == "base64":
        return [{"object": "embedding", "embedding": base64.b64encode(v.tobytes()).decode(), "index": i}
                for i, v in enumerate(vectors)]
    return [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)]
