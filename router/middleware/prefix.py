"""Infinity's `--url-prefix` (router process): its API routes answered under a prefix as well, e.g. `/v1/embeddings`.

The path is rewritten before anything else sees it, so the request is handled, rendered (Infinity's envelopes) and
counted exactly as the unprefixed Infinity route. With `--url-prefix /v1`, `/v1/models` is left alone: it keeps its
union shape, so SIE clients still work (spec/infinity.md, section 1).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

INFINITY_API_PATHS = ("/embeddings", "/rerank", "/classify", "/models")  # Infinity never prefixes /health, /metrics
KEPT = frozenset({"/v1/models"})  # our own route at that path wins


class UrlPrefix:
    def __init__(self, app: ASGIApp, prefix: str) -> None:
        self.app = app
        self.paths = {prefix + path: path for path in INFINITY_API_PATHS if prefix + path not in KEPT}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths:
            scope = {**scope, "path": self.paths[scope["path"]], "raw_path": self.paths[scope["path"]].encode()}
        await self.app(scope, receive, send)
