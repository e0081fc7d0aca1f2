"""The embeddings routes `/v1/embeddings` (OpenAI) and `/embeddings` (Infinity) (router process).

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

from sie_router.api.disconnect import guarded
from sie_router.api.model_info import served_outputs
from sie_router.api.state import app_state
from sie_router.errors import Api, SIEError, invalid
from sie_router.pipeline import codec
from sie_router.pipeline.inputs import check_dimensions, encode_job, image_items, input_items, parse_texts
from sie_router.pipeline.jobs import Encoded, EncodeJob, Resolved
from sie_router.pipeline.postprocess import cut_dimensions
from sie_router.pipeline.resolve import served_model
from sie_sdk.codes import ErrorCode
from sie_sdk.types import Item

# A profile's runtime options that reach a dense worker from these routes (the profile the client named may not be the
# default one, whose options the worker already has).
PROFILE_OPTIONS = ("pooling", "normalize", "prompt", "prompt_name")
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


def _check_dense(model: Resolved, modality: str) -> None:
    config = model.config
    outputs = served_outputs(config, model.profile)
    if "dense" not in outputs:
        raise SIEError(ErrorCode.MODEL_NOT_SUPPORTED,
                       f"model '{model.name}' has no dense output (it offers {outputs}); "
                       "use /v1/encode for sparse or multivector outputs", param="model")
    if modality not in MODALITIES:
        raise invalid(f"modality must be one of {list(MODALITIES)}, not {modality!r}", param="modality")
    if modality not in config.input_kinds:  # Infinity's capability check: a 400 naming what the model lacks
        raise SIEError(ErrorCode.MODEL_NOT_SUPPORTED, f"ModelNotDeployedError: model=`{model.name}` does not support "
                       f"`{MODALITIES[modality]}`; it takes {config.input_kinds}", param="model")


async def _encode(request: Request, job: EncodeJob, images: bool) -> Encoded:
    try:
        out: Encoded = await guarded(request, app_state(request).service.run(job))
        return out
    except SIEError as exc:
        if images and exc.code == ErrorCode.INVALID_INPUT:  # the worker could not use an image: Infinity's ImageCorrupt
            raise SIEError(ErrorCode.INVALID_MEDIA, f"ImageCorrupt: {exc.message}") from None
        raise


async def embed(request: Request, api: Api) -> Response:
    state = app_state(request)
    body = await codec.read_body(request, state.settings.max_request_bytes)
    req = codec.decode(body, EmbeddingsRequest, msgpack=False)
    model = served_model(state.registry, req.model, api)
    if req.encoding_format not in ("float", "base64"):
        raise invalid(f"encoding_format must be 'float' or 'base64', not {req.encoding_format!r}",
                      param="encoding_format")
    texts = parse_texts(req.input, allow_token_ids=True)
    if api is Api.INFINITY:
        texts = [t.strip() for t in texts]
    _check_dense(model, req.modality)
    raw_items = image_items(texts) if req.modality == "image" else [Item(text=t) for t in texts]
    items = input_items(raw_items, model.config, state.settings, field="input")
    runtime = model.runtime  # the profile the client named (`model:profile`), not always the default
    job = encode_job(model, items, ["dense"], runtime=runtime, is_query=req.is_query, instruction=req.instruction,
                     options={k: v for k, v in runtime.items() if k in PROFILE_OPTIONS},
                     wait_s=state.settings.load_wait_s)
    out = await _encode(request, job, images=req.modality == "image")
    assert out.dense is not None
    vectors = out.dense
    dims = check_dimensions(req.dimensions, model.config.dims.get("dense") or vectors.shape[1])
    if dims != vectors.shape[1]:
        vectors = cut_dimensions(vectors, dims, renormalize=api is Api.OPENAI and bool(runtime.get("normalize", True)))
    tokens = int(out.tokens.sum()) if api is Api.OPENAI else sum(len(t) for t in texts)
    prefix = "emb" if api is Api.OPENAI else "infinity"
    return codec.json_response({
        "object": "list", "data": _data(vectors, req.encoding_format), "model": model.name if api is Api.INFINITY
        else req.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "id": f"{prefix}-{uuid.uuid4()}", "created": int(time.time())})


async def openai_embeddings(request: Request) -> Response:
    return await embed(request, Api.OPENAI)


async def infinity_embeddings(request: Request) -> Response:
    return await embed(request, Api.INFINITY)


def _data(vectors: np.ndarray, encoding_format: str) -> list[dict[str, Any]]:
    vectors = vectors.astype("<f4", copy=False)
    if encoding_format == "base64":
        return [{"object": "embedding", "embedding": base64.b64encode(v.tobytes()).decode(), "index": i}
                for i, v in enumerate(vectors)]
    return [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)]
