"""Native SIE routes (router process): `/v1/encode|score|extract/{model}` and the model listing.

Wire-exact for sie-sdk 0.10.1: msgpack or JSON in, msgpack (or JSON when asked) out, arrays as msgpack-numpy maps.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.convertors import StringConvertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response

from sie_router.api.disconnect import guarded
from sie_router.api.model_info import model_info, served_dims
from sie_router.api.state import app_state
from sie_router.errors import invalid
from sie_router.pipeline import codec
from sie_router.pipeline.inputs import input_items, merged_options, native_encode, score_key
from sie_router.pipeline.jobs import BatchKey, Encoded, ExtractJob, Scored, ScoreJob, TokenizeJob, freeze
from sie_router.pipeline.postprocess import WIRE_DTYPE_NAMES, quantize
from sie_router.pipeline.resolve import resolve
from sie_sdk.types import DecodeRequest, EncodeRequest, ExtractRequest, Item, ScoreRequest, TokenizeRequest

MAX_SCORE_ITEMS = 1000


class _TokenOps(StringConvertor):
    regex = "tokenize|decode"


register_url_convertor("tokens", _TokenOps())
MAX_LABELS = 1000


def _timing(started: float) -> dict[str, Any]:
    total = (time.perf_counter() - started) * 1000.0
    return {"total_ms": total, "queue_ms": 0.0, "tokenization_ms": 0.0, "inference_ms": 0.0,
            "postprocessing_ms": None}


def encoded_item(out: Encoded, i: int, output_types: list[str], output_dtype: str, item_id: str | None,
                 sparse_dims: int | None = None) -> dict[str, Any]:
    dtype = WIRE_DTYPE_NAMES[output_dtype]
    body: dict[str, Any] = {} if item_id is None else {"id": item_id}
    if "dense" in output_types and out.dense is not None:
        dense = out.dense[i]
        body["dense"] = {"dims": int(dense.shape[-1]), "dtype": dtype, "values": quantize(dense, output_dtype)}
    if "sparse" in output_types and out.sparse is not None:
        indices, values = out.sparse.row(i)
        body["sparse"] = {"dims": sparse_dims, "dtype": "float16" if output_dtype == "float16" else "float32",
                          "indices": indices, "values": quantize(values, "float16") if output_dtype == "float16"
                          else values}
    if "multivector" in output_types and out.multivector is not None:
        (rows,) = out.multivector.row(i)
        body["multivector"] = {"token_dims": int(rows.shape[-1]), "num_tokens": int(rows.shape[0]), "dtype": dtype,
                               "values": quantize(rows, output_dtype)}
    return body


async def encode(request: Request) -> Response:
    state, model, started = app_state(request), request.path_params["model"], time.perf_counter()
    body = await codec.read_body(request, state.settings.max_request_bytes)
    req = codec.decode(body, EncodeRequest, msgpack=codec.is_msgpack(request))
    resolved = resolve(state.registry, model)
    job, output_dtype = native_encode(resolved, input_items(req.items, resolved.config, state.settings), req.params)
    out: Encoded = await guarded(request, state.service.run(job))
    sparse_dims = served_dims(state, resolved.config).get("sparse")
    output_types = list(job.key.output_types)
    results = [encoded_item(out, i, output_types, output_dtype, item.id, sparse_dims)
               for i, item in enumerate(req.items)]
    return codec.negotiated(request, {"model": model, "items": results, "timing": _timing(started),
                                      "usage": {"input_tokens": int(out.tokens.sum())}})


async def score(request: Request) -> Response:
    state, model = app_state(request), request.path_params["model"]
    body = await codec.read_body(request, state.settings.max_request_bytes)
    req = codec.decode(body, ScoreRequest, msgpack=codec.is_msgpack(request))
    resolved = resolve(state.registry, model)
    config = resolved.config
    if config.tasks.get("score") is None:
        raise invalid(f"model '{model}' cannot score; its outputs are {config.outputs}", param="model")
    if not req.items or len(req.items) > MAX_SCORE_ITEMS:
        raise invalid(f"score takes 1 to {MAX_SCORE_ITEMS} items, not {len(req.items)}", param="items")
    query = input_items([req.query], config, state.settings, field="query")[0]
    docs = input_items(req.items, config, state.settings)
    if not (query.text or "").strip():
        raise invalid("the query text is empty", param="query.text")
    job = ScoreJob(resolved, query.text or "", [d.text or "" for d in docs], score_key(resolved, req.options))
    scored: Scored = await guarded(request, state.service.run(job))
    ids = [item.id if item.id is not None else f"item-{i}" for i, item in enumerate(req.items)]
    order = sorted(range(len(scored)), key=lambda i: -scored.scores[i])
    scores = [{"item_id": ids[i], "score": float(scored.scores[i]), "rank": rank} for rank, i in enumerate(order)]
    return codec.negotiated(request, {"model": model, "query_id": req.query.id, "scores": scores,
                                      "usage": {"input_tokens": int(scored.tokens.sum())}})


async def extract(request: Request) -> Response:
    state, model = app_state(request), request.path_params["model"]
    body = await codec.read_body(request, state.settings.max_request_bytes)
    req = codec.decode(body, ExtractRequest, msgpack=codec.is_msgpack(request))
    resolved = resolve(state.registry, model)
    config = resolved.config
    if config.tasks.get("extract") is None:
        raise invalid(f"model '{model}' cannot extract; its outputs are {config.outputs}", param="model")
    labels = list((req.params.labels if req.params else None) or [])
    if len(labels) > MAX_LABELS:
        raise invalid(f"at most {MAX_LABELS} labels, not {len(labels)}", param="params.labels")
    items = input_items(req.items, config, state.settings)
    options = merged_options(resolved, req.params.options if req.params else None)
    key = BatchKey("extract", labels=tuple(labels), options=freeze(options))
    found = await guarded(request, state.service.run(ExtractJob(resolved, items, key)))
    results = []
    for i, (item, (extracted, _)) in enumerate(zip(req.items, found, strict=True)):
        results.append({"id": item.id if item.id is not None else f"item-{i}", "entities": extracted.entities,
                        "relations": extracted.relations, "classifications": extracted.classifications,
                        "objects": extracted.objects, "data": extracted.data})
    return codec.negotiated(request, {"model": model, "items": results,
                                      "usage": {"input_tokens": sum(t for _, t in found)}})


async def tokenize(request: Request) -> Response:
    state, model = app_state(request), request.path_params["model"]
    body = await codec.read_body(request, state.settings.max_request_bytes)
    req = codec.decode(body, TokenizeRequest, msgpack=codec.is_msgpack(request))
    resolved = resolve(state.registry, model)
    input_items([Item(text=t) for t in req.texts], resolved.config, state.settings, field="texts")  # the limits
    job = TokenizeJob(resolved, texts=req.texts, add_special_tokens=req.add_special_tokens)
    result = await guarded(request, state.service.run(job)) if req.texts else None
    tokens = [[{"id": t.id, "text": t.text, "special": t.special, "start": t.start, "stop": t.stop} for t in row]
              for row in (result.tokens if result else [])]
    return codec.negotiated(request, {"model": model, "tokens": tokens, "counts": [len(row) for row in tokens]})


async def decode(request: Request) -> Response:
    state, model = app_state(request), request.path_params["model"]
    body = await codec.read_body(request, state.settings.max_request_bytes)
    req = codec.decode(body, DecodeRequest, msgpack=codec.is_msgpack(request))
    resolved = resolve(state.registry, model)
    if not req.ids or len(req.ids) > state.settings.max_items_per_request:
        raise invalid(f"`ids` must hold 1 to {state.settings.max_items_per_request} lists", param="ids")
    result = await guarded(request, state.service.run(TokenizeJob(resolved, ids=req.ids,
                                                                  skip_special_tokens=req.skip_special_tokens)))
    return codec.negotiated(request, {"model": model, "texts": list(result.texts)})


async def tokens(request: Request) -> Response:
    """`/v1/tokenize/{model}` and `/v1/decode/{model}` (one route: `op` is the first path segment)."""
    return await (tokenize(request) if request.path_params["op"] == "tokenize" else decode(request))


async def list_models(request: Request) -> Response:
    state = app_state(request)
    infos = [model_info(state, name) for name in state.registry.served]
    data = [{"id": info["name"], "object": "model", "created": int(state.pool.started_at), "owned_by": "sie"}
            for info in infos]
    return codec.json_response({"object": "list", "data": data, "models": infos})


async def get_model(request: Request) -> Response:
    state = app_state(request)
    name = request.path_params["model"]
    resolve(state.registry, name)
    return codec.json_response(model_info(state, name))
