"""Infinity's `/classify` (router process): every label for every input, sorted, keys `score` then `label`."""

from __future__ import annotations

import time
import uuid

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from sie_router.api.disconnect import guarded
from sie_router.api.state import app_state
from sie_router.errors import Api, SIEError
from sie_router.pipeline import codec
from sie_router.pipeline.inputs import input_items, parse_texts
from sie_router.pipeline.jobs import BatchKey, ExtractJob, freeze
from sie_router.pipeline.resolve import served_model
from sie_sdk.codes import ErrorCode
from sie_sdk.types import Item


class ClassifyRequest(msgspec.Struct, kw_only=True):
    """Infinity's classify body."""

    input: object = msgspec.UNSET
    model: str = "default/not-specified"
    raw_scores: bool = False


async def classify(request: Request) -> Response:
    state = app_state(request)
    body = await codec.read_body(request, state.settings.max_request_bytes)
    req = codec.decode(body, ClassifyRequest, msgpack=False)
    texts = [t.strip() for t in parse_texts(req.input, allow_token_ids=False)]
    model = served_model(state.registry, req.model, Api.INFINITY)
    if model.config.tasks.get("extract") is None or model.family != "classifier":
        raise SIEError(ErrorCode.MODEL_NOT_SUPPORTED, f"ModelNotDeployedError: model=`{model.name}` does not support "
                       "`classify`.", param="model")
    items = input_items([Item(text=t) for t in texts], model.config, state.settings, field="input")
    # Infinity runs the text-classification pipeline: an NLI head scores its own labels, never zero-shot.
    options = {**model.runtime, "raw_scores": req.raw_scores, "zero_shot": False}
    job = ExtractJob(model, items, BatchKey("extract", options=freeze(options)), wait_s=state.settings.load_wait_s)
    found = await guarded(request, state.service.run(job))
    data = [[{"score": c.score, "label": c.label} for c in extracted.classifications] for extracted, _ in found]
    chars = sum(len(t) for t in texts)
    return codec.json_response({"object": "classify", "data": data, "model": model.name,
                                "usage": {"prompt_tokens": chars, "total_tokens": chars},
                                "id": f"infinity-{uuid.uuid4()}", "created": int(time.time())})
