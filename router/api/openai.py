"""OpenAI-compatible routes (router process): `/v1/embeddings`."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from sie_router.api.embeddings import embed
from sie_router.errors import Api


async def embeddings(request: Request) -> Response:
    return await embed(request, Api.OPENAI)
