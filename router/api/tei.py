"""TEI-compatible routes (router process): text-embeddings-inference 1.9.3's API, at the root and per model.

TEI serves one model; we serve many. At the root each route is answered by the default model of the type it needs
(`tei_models`, else the first served model of that type); under `/tei/{model}/` every route is answered by that
model, so one URL per model replaces one TEI container per model. Handlers decode a TEI body into jobs and return
TEI's response shape; `answer` renders it, and errors render in TEI's `{"error", "error_type"}`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import msgspec
import numpy as np
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response

from sie_router.api import tei_bodies as inputs
from sie_router.api.disconnect import guarded
from sie_router.api.model_info import served_dims, served_outputs
from sie_router.api.state import AppState, app_state
from sie_router.api.tei_bodies import backend, empty, validation
from sie_router.errors import Api, SIEError
from sie_router.models.model_card import ModelCard, model_card
from sie_router.models.registry import Registry
from sie_router.pipeline import codec
from sie_router.pipeline.inputs import encode_job, input_items, score_key
from sie_router.pipeline.jobs import BatchKey, Encoded, ExtractJob, Resolved, Scored, ScoreJob, TokenizeJob, freeze
from sie_router.pipeline.resolve import resolve
from sie_sdk.codes import ErrorCode
from sie_sdk.types import Item

TEI_VERSION = "1.9.3"
NOT_A = {"embedding": "Model is not an embedding model", "splade": "Model is not an embedding model with SPLADE "
         "pooling", "classifier": "Model is not a classifier model", "reranker": "model is not a re-ranker model"}
ALL_TYPES = ("embedding", "splade", "classifier", "reranker")


def model_type(model: Resolved) -> str | None:
    """TEI's model type for a served model: embedding, splade, classifier or reranker (None: none of them)."""
    outputs = served_outputs(model.config, model.profile)
    if model.family == "classifier":
        return "classifier"
    if "score" in outputs:
        return "reranker"
    if "dense" in outputs and "text" in model.config.input_kinds:
        return "embedding"
    return "splade" if "sparse" in outputs else None


@lru_cache(maxsize=8)
def defaults(registry: Registry, named: tuple[str, ...], generation: int) -> dict[str, str]:
    """The root's model per type: those named first, then the first served model of each type (cached per
    `generation` of the registry, which models added or removed at runtime change)."""
    found: dict[str, str] = {}
    for name in (*named, *registry.served):
        config, profile = registry.lookup(name)
        kind = model_type(Resolved(name, config, profile))
        if kind is not None:
            found.setdefault(kind, name)
            found.setdefault("primary", name)
    return found


@dataclass(frozen=True)
class Call:
    """One TEI request: the app state, and the model named in the path (None at the root)."""

    state: AppState
    fixed: Resolved | None

    def pick(self, *types: str) -> Resolved:
        """The model answering a route for these model types; 424 `Backend` when it is not of one of them."""
        if self.fixed is not None:
            if model_type(self.fixed) in types:
                return self.fixed
            raise backend(NOT_A[types[0]])
        registry = self.state.registry
        chosen = defaults(registry, self.state.settings.tei_models, registry.generation)
        name = next((chosen[t] for t in types if t in chosen), None)
        if name is None:
            raise backend(NOT_A[types[0]])
        return resolve(self.state.registry, name)

    def primary(self) -> Resolved:
        return self.pick(*ALL_TYPES) if self.fixed is None else self.fixed

    async def card(self, model: Resolved) -> ModelCard:
        return await asyncio.to_thread(model_card, model.config)

    async def run(self, request: Request, job: Any) -> Any:
        return await guarded(request, self.state.service.run(job))


Handler = Callable[[Call, Request, bytes], Awaitable[Any]]


async def _texts(call: Call, request: Request, model: Resolved, raw: list[str | list[int]]) -> list[str]:
    """Texts of an `inputs` list: token-id inputs are decoded with the model's own tokenizer, as TEI does."""
    ids = [x for x in raw if isinstance(x, list)]
    if not ids:
        return [x for x in raw if isinstance(x, str)]
    job = TokenizeJob(model, ids=ids, skip_special_tokens=True, wait_s=call.state.settings.load_wait_s)
    decoded = await call.run(request, job)
    texts = iter(decoded.texts)
    return [x if isinstance(x, str) else next(texts) for x in raw]


async def _encode(call: Call, request: Request, model: Resolved, texts: list[str], output: str,
                  options: dict[str, Any], prompt: str) -> Encoded:
    """Encode with TEI's prompt: a dense encoder's worker puts it before each text itself, as sentence-transformers
    does (leaving its tokens out of pooling where the checkpoint says so), and "" keeps the checkpoint's own default
    prompt off, as TEI does; other families get the texts prefixed here."""
    if model.config.family(model.profile) == "dense":
        options = {**options, "prompt": prompt}
    else:
        texts = [prompt + t for t in texts]
    items = input_items([Item(text=t) for t in texts], model.config, call.state.settings, field="inputs")
    runtime = model.runtime
    worker = {k: v for k, v in runtime.items() if k == "pooling"} | options
    job = encode_job(model, items, [output], runtime=runtime, options=worker, wait_s=call.state.settings.load_wait_s)
    out: Encoded = await call.run(request, job)
    return out


async def _embedded(call: Call, request: Request, req: inputs.EmbedRequest, model: Resolved, output: str,
                    normalize: bool) -> Encoded:
    raw = inputs.embed_inputs(req.inputs, call.state.settings.max_client_batch_size)
    texts = await _texts(call, request, model, raw)
    prompt = inputs.prompt(await call.card(model), req.prompt_name, call.state.settings)
    options = inputs.truncation(req.truncate, req.truncation_direction, call.state.settings) | {"normalize": normalize}
    return await _encode(call, request, model, texts, output, options, prompt)


async def embed(call: Call, request: Request, body: bytes) -> Any:
    req = inputs.decode(body, inputs.EmbedRequest)
    model = call.pick("embedding", "splade")
    if model_type(model) == "splade":  # TEI turns the sparse vector dense, only with `normalize: false`
        if req.normalize:
            raise backend("`normalize` is not available for SPLADE models")
        return _dense_from_sparse(await _embedded(call, request, req, model, "sparse", False),
                                  served_dims(call.state, model.config, model.profile).get("sparse", 0))
    out = await _embedded(call, request, req, model, "dense", req.normalize)
    assert out.dense is not None
    return inputs.cut(out.dense, req.dimensions, req.normalize)


def _dense_from_sparse(out: Encoded, width: int) -> np.ndarray:
    assert out.sparse is not None
    vectors = np.zeros((len(out), width), dtype=np.float32)
    for i in range(len(out)):
        indices, values = out.sparse.row(i)
        vectors[i, indices] = values
    return vectors


async def embed_sparse(call: Call, request: Request, body: bytes) -> Any:
    req = inputs.decode(body, inputs.EmbedRequest)
    out = await _embedded(call, request, req, call.pick("splade"), "sparse", False)
    assert out.sparse is not None
    rows = []
    for i in range(len(out)):
        indices, values = out.sparse.row(i)
        order = np.argsort(indices, kind="stable")
        rows.append([{"index": int(indices[j]), "value": float(values[j])} for j in order if values[j] != 0])
    return rows


async def embed_all(call: Call, request: Request, body: bytes) -> Any:
    inputs.decode(body, inputs.EmbedRequest)
    call.pick("embedding")
    raise backend("`/embed_all` is not available here: SIE's embedding workers return pooled vectors only")


async def similarity(call: Call, request: Request, body: bytes) -> Any:
    req = inputs.decode(body, inputs.SimilarityRequest)
    sentences = req.inputs.sentences
    if not sentences:
        raise empty("`inputs.sentences` cannot be empty")
    if not req.inputs.source_sentence:
        raise empty("`inputs` cannot be empty")
    inputs.check_batch(len(sentences) + 1, call.state.settings.max_client_batch_size)
    model = call.pick("embedding")
    params = req.parameters or inputs.SimilarityParameters()
    prompt = inputs.prompt(await call.card(model), params.prompt_name, call.state.settings)
    options = inputs.truncation(params.truncate, params.truncation_direction, call.state.settings)
    texts = [req.inputs.source_sentence, *sentences]
    out = await _encode(call, request, model, texts, "dense", options | {"normalize": False}, prompt)
    assert out.dense is not None
    vectors = out.dense.astype(np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    norms[norms == 0] = 1.0
    return [float(x) for x in (vectors[1:] @ vectors[0]) / (norms[1:] * norms[0])]


async def rerank(call: Call, request: Request, body: bytes) -> Any:
    req = inputs.decode(body, inputs.TEIRerankRequest)
    if not req.texts:
        raise empty("`texts` cannot be empty")
    inputs.check_batch(len(req.texts), call.state.settings.max_client_batch_size)
    model = call.pick("reranker")
    inputs.refuse_prompt_with_pairs(call.state.settings)
    if not req.query or not all(req.texts):
        raise empty("`inputs` cannot be empty")
    options = inputs.truncation(req.truncate, req.truncation_direction, call.state.settings)
    job = ScoreJob(model, req.query, req.texts, score_key(model, options), wait_s=call.state.settings.load_wait_s)
    scored: Scored = await call.run(request, job)
    values = scored.raw if req.raw_scores else scored.scores
    order = sorted(range(len(values)), key=lambda i: (values[i], i), reverse=True)  # ties: higher index first
    if req.return_text:
        return [{"index": i, "text": req.texts[i], "score": float(values[i])} for i in order]
    return [{"index": i, "score": float(values[i])} for i in order]


async def predict(call: Call, request: Request, body: bytes) -> Any:
    req = inputs.decode(body, inputs.PredictRequest)
    items, batched = inputs.predict_inputs(req.inputs, call.state.settings.max_client_batch_size)
    pairs = all(len(item) == 2 for item in items)  # at the root, pairs go to the default reranker
    model = call.pick("reranker", "classifier") if pairs else call.pick("classifier", "reranker")
    card = await call.card(model)
    options = inputs.truncation(req.truncate, req.truncation_direction, call.state.settings)
    if model_type(model) == "reranker":
        inputs.refuse_prompt_with_pairs(call.state.settings)
        found = await _predict_pairs(call, request, model, card, items, options, req.raw_scores)
    else:
        found = await _predict_texts(call, request, model, card, items, options, req.raw_scores)
    return found if batched else found[0]


async def _predict_texts(call: Call, request: Request, model: Resolved, card: ModelCard, items: list[list[str]],
                         options: dict[str, Any], raw_scores: bool) -> list[list[dict[str, Any]]]:
    if any(len(item) != 1 for item in items):
        raise validation("pair inputs need a re-ranker model (a cross-encoder with one label); this model "
                         "classifies single texts")
    prompt = inputs.prompt(card, None, call.state.settings)
    texts = [prompt + item[0] for item in items]
    extract = input_items([Item(text=t) for t in texts], model.config, call.state.settings, field="inputs")
    worker = {**model.runtime, **options, "raw_scores": raw_scores, "zero_shot": False}
    job = ExtractJob(model, extract, BatchKey("extract", options=freeze(worker)), call.state.settings.load_wait_s)
    found = await call.run(request, job)
    label_ids = {label: int(i) for i, label in card.id2label.items()}
    results = []
    for extracted, _ in found:  # TEI's order: score descending, ties in reverse label-id order
        ranked = sorted(extracted.classifications, key=lambda c: (c.score, label_ids.get(c.label, 0)), reverse=True)
        results.append([{"score": c.score, "label": c.label} for c in ranked])
    return results


async def _predict_pairs(call: Call, request: Request, model: Resolved, card: ModelCard, items: list[list[str]],
                         options: dict[str, Any], raw_scores: bool) -> list[list[dict[str, Any]]]:
    if any(len(item) != 2 for item in items):
        raise validation("a re-ranker model takes (query, text) pairs, not single texts")
    label = card.id2label.get("0", "LABEL_0")
    key = score_key(model, options)
    jobs = [ScoreJob(model, query, [text], key, call.state.settings.load_wait_s) for query, text in items]
    scored: list[Scored] = await asyncio.gather(*(call.run(request, job) for job in jobs))
    return [[{"score": float((s.raw if raw_scores else s.scores)[0]), "label": label}] for s in scored]


async def tokenize(call: Call, request: Request, body: bytes) -> Any:
    req = inputs.decode(body, inputs.TEITokenizeRequest)
    texts = [req.inputs] if isinstance(req.inputs, str) else req.inputs
    if not texts:
        raise empty("`inputs` cannot be empty")
    inputs.check_batch(len(texts), call.state.settings.max_client_batch_size)
    model = call.primary()
    prompt = inputs.prompt(await call.card(model), req.prompt_name, call.state.settings)
    job = TokenizeJob(model, texts=[prompt + t for t in texts], add_special_tokens=req.add_special_tokens,
                      wait_s=call.state.settings.load_wait_s)
    result = await call.run(request, job)
    return [[{"id": t.id, "text": t.text, "special": t.special, "start": t.start, "stop": t.stop} for t in tokens]
            for tokens in result.tokens]


async def decode(call: Call, request: Request, body: bytes) -> Any:
    req = inputs.decode(body, inputs.TEIDecodeRequest)
    ids = inputs.id_lists(req.ids, call.state.settings.max_client_batch_size)
    job = TokenizeJob(call.primary(), ids=ids, skip_special_tokens=req.skip_special_tokens,
                      wait_s=call.state.settings.load_wait_s)
    result = await call.run(request, job)
    return list(result.texts)


async def info(call: Call, request: Request, body: bytes) -> Any:
    model = call.primary()
    card, settings = await call.card(model), call.state.settings
    worker = call.state.pool.slots[model.key].worker
    found = worker.info.max_sequence_length if worker and worker.info else None
    kind = model_type(model)
    if kind in ("classifier", "reranker"):
        labels = {"id2label": card.id2label, "label2id": {v: int(k) for k, v in card.id2label.items()}}
        model_kind: dict[str, Any] = {kind: labels}
    else:
        pooling = "splade" if kind == "splade" else card.pooling or model.runtime.get("pooling") or "mean"
        model_kind = {"embedding": {"pooling": pooling}}
    limits = call.state.pool.batch_limits(model.key)
    # What the loaded worker computes in (a lean runtime picks bf16 under `auto`), else what it is configured to.
    precision = worker.info.precision if worker and worker.info else settings.dtype if settings.dtype != "auto" else (
        model.config.profiles[model.profile].compute_precision or "float32")
    return {"model_id": model.config.hf_id or model.key, "model_sha": model.config.hf_revision,
            "model_dtype": precision, "served_model_name": model.name, "model_type": model_kind,
            "max_concurrent_requests": settings.max_queue_items,
            "max_input_length": card.max_seq_length or model.config.max_sequence_length or found or 512,
            "max_batch_tokens": limits.max_tokens, "max_batch_requests": limits.max_items,
            "max_client_batch_size": settings.max_client_batch_size,
            "auto_truncate": settings.auto_truncate, "tokenization_workers": 1, "version": TEI_VERSION,
            "sha": None, "docker_label": None}


ROUTE_FOR_TYPE = {"embedding": "embed", "splade": "embed_sparse", "classifier": "predict", "reranker": "predict"}


def _dispatched(call: Call, body: bytes) -> str:
    """TEI's `POST /`: by the model's type; we also recognise a rerank or a similarity body by its shape."""
    shape = inputs.shape_of(body)
    if shape == "rerank":
        return "rerank"
    if shape == "similarity":
        return "similarity"
    kind = model_type(call.primary())
    return ROUTE_FOR_TYPE[kind] if kind else "embed"


async def dispatch(call: Call, request: Request, body: bytes) -> Any:
    return await HANDLERS[_dispatched(call, body)](call, request, body)


async def vertex(call: Call, request: Request, body: bytes) -> Any:
    instances = inputs.decode(body, inputs.VertexRequest).instances
    if not instances:
        raise empty("`instances` cannot be empty")
    bodies = [msgspec.json.encode(instance) for instance in instances]
    found = await asyncio.gather(*(dispatch(call, request, b) for b in bodies))
    return {"predictions": list(found)}


HANDLERS: dict[str, Handler] = {
    "embed": embed, "embed_sparse": embed_sparse, "embed_all": embed_all, "similarity": similarity,
    "rerank": rerank, "predict": predict, "tokenize": tokenize, "decode": decode, "vertex": vertex,
    "invocations": dispatch, "": dispatch, "info": info,
}
PROBES = frozenset({"health", "ping"})


async def answer(request: Request, route: str, fixed: Resolved | None = None) -> Response:
    """Run one TEI route and render its body; errors on this request render in TEI's envelope."""
    request.scope["sie.api"] = Api.TEI
    state = app_state(request)
    call = Call(state, fixed)
    if route in PROBES or (route == "" and request.method == "GET"):
        return _health(state, fixed)
    body = b"" if request.method == "GET" else await _body(request, state)
    return codec.json_response(await HANDLERS[route](call, request, body))


async def _body(request: Request, state: AppState) -> bytes:
    if "json" not in request.headers.get("content-type", ""):
        raise SIEError(ErrorCode.INVALID_INPUT,
                       "Expected request with `Content-Type: application/json`", plain_status=415)
    return await codec.read_body(request, state.settings.max_request_bytes)


def _health(state: AppState, fixed: Resolved | None) -> Response:
    failed = fixed is not None and state.pool.slots[fixed.key].state == "failed"
    if state.ready and state.pool.accepting and not failed:
        return Response(status_code=200)
    return codec.json_response({"error": "unhealthy", "error_type": "Unhealthy"}, status=503)


def split_path(rest: str, known: Callable[[str], bool]) -> tuple[str, str] | None:
    """`/tei/{rest}` as (model, route): the model is the known name the path starts with, so ids holding `/`
    (`BAAI/bge-small-en-v1.5`) need no escaping; a trailing `/` (kept by huggingface_hub on POST) is the root.
    `known` is the served names here, and also those of other pools when a request is forwarded."""
    rest = rest.rstrip("/")
    if known(rest):
        return rest, ""
    head, _, route = rest.rpartition("/")
    if known(head) and (route in HANDLERS or route in PROBES):
        return head, route
    return None


async def per_model(request: Request, rest: str) -> Response:
    """Every TEI route under `/tei/{model}/`, answered by that model."""
    request.scope["sie.api"] = Api.TEI
    state = app_state(request)
    found = split_path(rest, state.registry.served.__contains__)
    if found is None:
        raise SIEError(ErrorCode.MODEL_NOT_FOUND, f"no served model or TEI route at {request.url.path}; served models: "
                       f"{list(state.registry.served)}")
    name, route = found
    reads = route in PROBES or route == "info" or (route == "" and request.method == "GET")
    if reads != (request.method == "GET"):
        raise SIEError(ErrorCode.METHOD_NOT_ALLOWED, "method not allowed")
    return await answer(request, route, resolve(state.registry, name))


class _Names(Convertor[str]):
    """A path segment that is one of a fixed set of route names ("" included: the root itself)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.regex = "|".join(n if n == PER_MODEL else re.escape(n) for n in names)

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


# TEI's routes are two Starlette routes, one per method: the root names plus `tei/{model}/...`. The route list
# (and the OpenAPI document made from it) stays short, and the handler is the same for every name anyway.
POST_NAMES = ("", "embed", "embed_sparse", "embed_all", "predict", "similarity", "tokenize", "decode", "invocations",
              "vertex")
GET_NAMES = ("", "info", "ping")
PER_MODEL = "tei/.+"
register_url_convertor("tei_post", _Names((*POST_NAMES, PER_MODEL)))
register_url_convertor("tei_get", _Names((*GET_NAMES, PER_MODEL)))
ROOT_PATHS = frozenset("/" + name for name in (*POST_NAMES, *GET_NAMES))
PER_MODEL_PREFIX = "/tei/"


def is_tei_path(path: str) -> bool:
    """A path of TEI's API, at the root or per model (`/rerank` is Infinity's too: its handler marks TEI's)."""
    return path in ROOT_PATHS or path.rstrip("/") in ROOT_PATHS or path.startswith(PER_MODEL_PREFIX)


def is_probe(method: str, path: str) -> bool:
    """TEI's health probes: `GET /`, `/ping`, and `/tei/{model}/health` or `/ping`."""
    return ((path == "/" and method == "GET") or path == "/ping"
            or (path.startswith(PER_MODEL_PREFIX) and path.endswith(tuple("/" + name for name in PROBES))))


async def route(request: Request) -> Response:
    """TEI at the root (`POST /embed`, `GET /info`, `POST /`, ...: the default models) or per model (`/tei/...`)."""
    name: str = request.path_params["route"]
    if name.startswith(PER_MODEL_PREFIX[1:]):
        return await per_model(request, name[len(PER_MODEL_PREFIX) - 1:])
    return await answer(request, name)
