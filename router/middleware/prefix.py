"""Infinity's `--url-prefix` (router process): its API routes answered under a prefix as well, e.g. `/v1/embeddings`.

The path is rewritten before anything else sees it, so the request is handled, rendered (Infinity's envelopes) and
counted exactly as the unprefixed Infinity route. With `--url-prefix /v1`, `/v1/models` is left alone: it keeps its
union shape, so SIE clients still work (spec/infinity.md, section 1).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from sie_router.api.routes import prefixed_paths


class UrlPrefix:
    """Rewrites the prefixed paths of the routes the table marks `prefixed` (Infinity never prefixes `/health` or
    `/metrics`); a route marked `keeps_path` keeps its own path."""

    def __init__(self, app: ASGIApp, prefix: str) -> None:
        self.app = app
        self.paths = prefixed_paths(prefix)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths:
            scope = {**scope, "path": self.paths[scope["path"]], "raw_path": self.paths[scope["path"]].encode()}
        await self.app(scope, receive, send)
