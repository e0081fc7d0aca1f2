"""Rerank routes (router process): Cohere/Jina-style `/v1/rerank` and Infinity's `/rerank`, one handler.

They differ only in the `document` field (`{"text"}` or a plain string), usage counting and error envelopes.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from sie_router.api.disconnect import guarded
from sie_router.api.model_info import served_outputs
from sie_router.api.state import app_state
from sie_router.errors import Api, SIEError, invalid
from sie_router.pipeline import codec
from sie_router.pipeline.inputs import score_key
from sie_router.pipeline.jobs import Scored, ScoreJob
from sie_router.pipeline.resolve import served_model
from sie_sdk.codes import ErrorCode

MAX_DOCUMENTS = 1000


class RerankRequest(msgspec.Struct, kw_only=True):
    """The union of Cohere, Jina and Infinity rerank bodies; unknown fields are ignored."""

    query: str
    documents: list[str | dict[str, Any]]
    model: str = "default/not-specified"
    top_n: int | None = None
    return_documents: bool = False
    raw_scores: bool = False
    options: dict[str, Any] | None = None


def _documents(raw: list[str | dict[str, Any]]) -> list[str]:
    texts = []
    for i, doc in enumerate(raw):
        text = doc if isinstance(doc, str) else doc.get("text")
        if not isinstance(text, str):
            raise invalid(f"documents[{i}] must be a string or {{\"text\": str}}", param="documents")
        texts.append(text)
    return texts


async def rerank(request: Request, api: Api) -> Response:
    state = app_state(request)
    body = await codec.read_body(request, state.settings.max_request_bytes)
    req = codec.decode(body, RerankRequest, msgpack=False)
    documents = _documents(req.documents)
    if api is Api.INFINITY:
        documents, query = [d.strip() for d in documents], req.query.strip()
    else:
        query = req.query
    if not documents or len(documents) > MAX_DOCUMENTS:
        raise invalid(f"`documents` must hold 1 to {MAX_DOCUMENTS} entries, not {len(documents)}", param="documents")
    if not query.strip():
        raise invalid("`query` is empty", param="query")
    if req.top_n is not None and req.top_n <= 0:
        raise invalid("`top_n` must be positive", param="top_n")
    model = served_model(state.registry, req.model, api)
    if model.config.tasks.get("score") is None:
        prefix = "ModelNotDeployedError: " if api is Api.INFINITY else ""  # Infinity's capability error
        raise SIEError(ErrorCode.MODEL_NOT_SUPPORTED,
                       f"{prefix}model=`{model.name}` does not support `rerank`; it offers "
                       f"{served_outputs(model.config, model.profile)}", param="model")
    job = ScoreJob(model, query, documents, score_key(model, req.options), wait_s=state.settings.load_wait_s)
    scored: Scored = await guarded(request, state.service.run(job))
    values = scored.raw if req.raw_scores else scored.scores
    order = sorted(range(len(scored)), key=lambda i: -values[i])[:req.top_n]
    results = [{"relevance_score": float(values[i]), "index": i, "document": _document(documents[i], req, api)}
               for i in order]
    tokens = int(scored.tokens.sum()) if api is Api.OPENAI else sum(len(query + d) for d in documents)
    prefix = "rerank" if api is Api.OPENAI else "infinity"
    return codec.json_response({"object": "rerank", "results": results, "model": model.name,
                                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                                "id": f"{prefix}-{uuid.uuid4()}", "created": int(time.time())})


def _document(text: str, req: RerankRequest, api: Api) -> Any:
    if not req.return_documents:
        return None
    return text if api is Api.INFINITY else {"text": text}


async def openai_rerank(request: Request) -> Response:
    return await rerank(request, Api.OPENAI)


async def infinity_rerank(request: Request) -> Response:
    return await rerank(request, Api.INFINITY)
